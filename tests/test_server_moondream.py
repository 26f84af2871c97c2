"""The official `moondream` client against `tidal serve` (Moondream-compatible API)."""

from __future__ import annotations

import base64
import io
import json

import moondream
import pytest
from conftest import (
    LiveServer,
    assert_matches_golden,
    case_id,
    golden_cases,
    golden_image,
    wait_engine_idle,
)
from moondream.types import Base64EncodedImage
from PIL import Image

from tidal import EngineConfig, Moondream

CASES = [c for c in golden_cases() if c["kind"] in ("query", "caption", "detect", "point") and c["image"] in ("wide", "tall")]


@pytest.fixture(scope="module")
def live(golden_md):
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig())
    srv = LiveServer(md)
    yield srv
    srv.stop()
    md.close()


@pytest.fixture(scope="module")
def client(live):
    return moondream.vl(endpoint=f"{live.url}/v1")


def png_image(name: str) -> Base64EncodedImage:
    """Lossless: the client sends it as is (a PIL image it would re-encode as JPEG)."""
    data = base64.b64encode(golden_image(name).read_bytes()).decode()
    return Base64EncodedImage(image_url=f"data:image/png;base64,{data}")


def _call(client, case, stream: bool):
    img = png_image(case["image"])
    kind = case["kind"]
    if kind == "query":
        out = client.query(img, case["question"], stream=stream, settings=case["settings"], reasoning=case["reasoning"], spatial_refs=case.get("spatial_refs"))
        if stream:
            out["answer"] = "".join(out["answer"])
        return out
    if kind == "caption":
        out = client.caption(img, case["length"], stream=stream, settings=case["settings"])
        if stream:
            out["caption"] = "".join(out["caption"])
        return out
    return client.detect(img, case["object"], settings=case["settings"]) if kind == "detect" else client.point(img, case["object"], settings=case["settings"])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_client_gets_reference_results(live, client, case):
    assert_matches_golden(_call(client, case, stream=False), case)


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] in ("query", "caption")], ids=case_id)
def test_client_streams_reference_text(live, client, case):
    out = _call(client, case, stream=True)
    key = "answer" if case["kind"] == "query" else "caption"  # the stream carries the answer text
    assert out[key] == case["result"][key]


def test_client_jpeg_images_match_the_python_api(live, client, golden_md):
    """A PIL image goes over the wire as JPEG; the server must answer as the
    Python API does on those same JPEG bytes."""
    pil = Image.open(golden_image("tall")).convert("RGB")
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=95)  # what the client sends
    local = {"temperature": 0, "max_tokens": 12}
    assert client.query(pil, "what color is the car", settings=local) == golden_md.query(buf.getvalue(), "what color is the car", settings=local)
    assert client.detect(pil, "dog", settings={"max_objects": 4}) == golden_md.detect(buf.getvalue(), "dog", settings={"max_objects": 4})
    assert client.point(pil, "dog", settings={"max_objects": 4}) == golden_md.point(buf.getvalue(), "dog", settings={"max_objects": 4})


def test_text_only_query(live, client):
    case = golden_cases("query")[-1]
    assert case["image"] is None
    assert client.query(question=case["question"], settings=case["settings"]) == case["result"]


def test_no_reasoning_field_means_no_reasoning(live):
    import httpx

    img = png_image("wide").image_url
    body = {"image_url": img, "question": "how many people are there", "settings": {"temperature": 0, "max_tokens": 16}}
    out = httpx.post(f"{live.url}/v1/query", json=body, timeout=60).json()
    assert "reasoning" not in out and out["answer"] == "w38499 w40968"
    with_reasoning = httpx.post(f"{live.url}/v1/query", json=dict(body, reasoning=True), timeout=60).json()
    want = next(c for c in golden_cases("query") if c["image"] == "wide" and c["reasoning"])["result"]
    assert {k: with_reasoning[k] for k in ("reasoning", "answer")} == json.loads(json.dumps(want))
    wait_engine_idle(live.md)
