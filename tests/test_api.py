"""The Python API: image inputs, streaming, reuse, concurrency, sampling options."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from conftest import (
    GOLDEN,
    assert_engine_idle,
    assert_matches_golden,
    golden_cases,
    golden_image,
    run_case,
    wait_finished,
)
from PIL import Image

from tidal import InvalidRequestError, Moondream

WIDE_QUERY = next(c for c in golden_cases("query") if c["image"] == "wide" and not c["reasoning"] and not c.get("spatial_refs"))
WIDE_REASON = next(c for c in golden_cases("query") if c["image"] == "wide" and c["reasoning"])
WIDE_CAPTION = next(c for c in golden_cases("caption") if c["image"] == "wide")


def _image_forms():
    path = golden_image("wide")
    pil = Image.open(path).convert("RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return {"path": path, "str path": str(path), "bytes": buf.getvalue(), "PIL": pil, "numpy": np.asarray(pil), "RGBA PIL": pil.convert("RGBA")}


@pytest.mark.parametrize("form", list(_image_forms()))
def test_every_image_form_gives_the_reference_result(golden_md, form):
    assert_matches_golden(run_case(golden_md, WIDE_QUERY, _image_forms()[form]), WIDE_QUERY)


def test_streamed_text_joins_to_the_result(golden_md, golden_encoded):
    out = golden_md.query(golden_encoded["wide"], WIDE_QUERY["question"], stream=True, settings=WIDE_QUERY["settings"])
    chunks = list(out["answer"])
    assert chunks == ["w38499 ", "w40968"]  # cut after the space, as the reference streams
    assert "".join(chunks) == WIDE_QUERY["result"]["answer"]
    cap = golden_md.caption(golden_encoded["wide"], WIDE_CAPTION["length"], stream=True, settings=WIDE_CAPTION["settings"])
    assert "".join(cap["caption"]) == WIDE_CAPTION["result"]["caption"]


def test_streamed_reasoning(golden_md, golden_encoded):
    c = WIDE_REASON
    out = golden_md.query(golden_encoded["wide"], c["question"], reasoning=True, stream=True, settings=c["settings"])
    assert {"reasoning": out["reasoning"], "answer": "".join(out["answer"])} == c["result"] | {
        "reasoning": {"text": c["result"]["reasoning"]["text"], "grounding": [dict(g, points=[tuple(p) for p in g["points"]]) for g in c["result"]["reasoning"]["grounding"]]}
    }


def test_closing_a_stream_early_cancels_and_frees(tiny_md):
    out = tiny_md.caption(golden_image("wide"), "long", stream=True, settings={"max_tokens": 3000, "temperature": 0})
    it = iter(out["caption"])
    next(it)
    it.close()
    req = out["caption"]._handle.request
    wait_finished(req)
    assert req.cancelled and req.skill.completion_tokens < 300
    assert_engine_idle(tiny_md.engine)


def test_concurrent_mixed_skills_match_one_at_a_time(golden_md, golden_encoded):
    cases = [c for c in golden_cases() if c["kind"] in ("query", "caption", "detect", "point") and c["image"] in ("tall", "wide", None)]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def work(i, c):
        try:
            img = None if c["image"] is None else (golden_encoded[c["image"]] if i % 2 else golden_image(c["image"]))
            results[i] = run_case(golden_md, c, img)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == len(cases) == 33
    for i, c in enumerate(cases):
        assert_matches_golden(results[i], c)


def test_seeded_sampling_repeats(golden_md, golden_encoded):
    s = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 12, "seed": 1234}
    a = golden_md.caption(golden_encoded["big"], "long", settings=s)
    b = golden_md.caption(golden_encoded["big"], "long", settings=s)
    others = {golden_md.caption(golden_encoded["big"], "long", settings=dict(s, seed=k))["caption"] for k in range(4)}
    assert a == b
    assert len(others | {a["caption"]}) > 1  # different seeds explore different answers


def test_stop_strings_end_the_answer(golden_md, golden_encoded):
    full = golden_md.query(golden_encoded["wide"], WIDE_QUERY["question"], settings=WIDE_QUERY["settings"])["answer"]
    assert full == "w38499 w40968"
    cut = golden_md.query(golden_encoded["wide"], WIDE_QUERY["question"], settings=dict(WIDE_QUERY["settings"], stop=[" w409"]))
    assert cut["answer"] == "w38499"
    chunks = list(golden_md.query(golden_encoded["wide"], WIDE_QUERY["question"], stream=True, settings=dict(WIDE_QUERY["settings"], stop="40968"))["answer"])
    assert "".join(chunks) == "w38499 w"


def test_max_tokens_bounds_the_answer(golden_md, golden_encoded):
    out = golden_md.caption(golden_encoded["tall"], "long", settings={"temperature": 0, "max_tokens": 1})
    assert out["caption"] == "w38499"  # the first greedy token of the reference's answer


def test_encoded_image_belongs_to_its_model(golden_md, golden_encoded):
    other = Moondream(golden_md.model, golden_md.tokenizer)
    try:
        with pytest.raises(InvalidRequestError, match="another model instance"):
            other.caption(golden_encoded["wide"])
        assert_matches_golden(run_case(other, WIDE_QUERY, other.encode_image(GOLDEN / "images" / "wide.png")), WIDE_QUERY)
    finally:
        other.close()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "GIF"])
def test_every_accepted_format_decodes(fmt):
    """Bytes of each format the API accepts decode (Pillow 13 has no separate
    MPO opener: naming it made Image.open give up before BMP, GIF, WebP and
    TIFF); the lossless ones to the very pixels."""
    from tidal.images import load_image

    rgb = Image.open(golden_image("wide")).convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    got = load_image(buf.getvalue())
    assert got.size == rgb.size
    if fmt != "GIF":  # GIF holds a palette of 256 colours
        assert np.array_equal(np.asarray(got), np.asarray(rgb))
