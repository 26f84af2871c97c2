"""`tidal demo`: run every Moondream 3 skill once and print each result and its time."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from tidal.api import Moondream

SAMPLE_IMAGE = "sample.png"


def sample_image_path() -> Path:
    return Path(str(resources.files("tidal") / "assets" / SAMPLE_IMAGE))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1000


def run_demo(
    model: str | None = None,
    image: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_tokens: int = 48,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Load the model (default: the embedded tiny one), run each skill, print and return the results."""
    if model is None:
        from tidal.models.moondream3.tiny import ensure_tiny_checkpoint

        folder = ensure_tiny_checkpoint()
        out(f"model: embedded tiny Moondream 3 with random weights ({folder})")
        out("       (random weights: the words and boxes are noise; timings and shapes are real)")
        model = str(folder)
    else:
        out(f"model: {model}")
    md, load_ms = _timed(lambda: Moondream.from_pretrained(model, device=device, dtype=dtype))
    out(f"device: {md.model.device}, dtype: {str(md.model.dtype).replace('torch.', '')}, loaded in {load_ms:.0f} ms")
    img_path = Path(image) if image else sample_image_path()
    with Image.open(img_path) as im:
        out(f"image: {img_path} ({im.width}x{im.height})")
    text = {"max_tokens": max_tokens, "temperature": 0.0}
    results: dict[str, Any] = {}
    try:
        enc, ms = _timed(lambda: md.encode_image(img_path))
        out(f"\n{'encode_image':<28}{ms:9.1f} ms  {enc}")
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("caption short", lambda: md.caption(enc, "short", settings=text)),
            ("caption normal (streamed)", lambda: {"caption": "".join(md.caption(enc, "normal", stream=True, settings=text)["caption"])}),
            ("query", lambda: md.query(enc, "What is in this image?", settings=text)),
            ("query + reasoning", lambda: md.query(enc, "How many cars are there?", reasoning=True, settings=text)),
            ("query + spatial ref", lambda: md.query(enc, "What is this?", spatial_refs=[[0.6, 0.65, 0.84, 0.87]], settings=text)),
            ("query, text only", lambda: md.query(None, "Write one sentence about the sea.", settings=text)),
            ("detect 'car'", lambda: md.detect(enc, "car", settings={"max_objects": 10})),
            ("point 'tree'", lambda: md.point(enc, "tree", settings={"max_objects": 10})),
            ("caption from file path", lambda: md.caption(img_path, "short", settings=text)),
        ]
        for name, fn in steps:
            result, ms = _timed(fn)
            results[name] = result
            out(f"{name:<28}{ms:9.1f} ms  {json.dumps(result)[:400]}")
    finally:
        md.close()
    return results
