"""The official `moondream` client against `tidal serve` (Moondream-compatible API)."""

from __future__ import annotations

import base64
import io
import json

import moondream
import pytest
from conftest import (
    LiveServer,
    PromptRecorder,
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


@pytest.mark.parametrize("path, body, skill, args", [
    ("/v1/query", {"question": "how many people are there"}, "query", ("how many people are there", False)),
    ("/v1/query", {"question": "how many people are there", "reasoning": True}, "query", ("how many people are there", True)),
    ("/v1/query", {"question": "what is this", "spatial_refs": [[0.25, 0.5], [0.1, 0.2, 0.6, 0.9]]}, "query", ("what is this", False, [[0.25, 0.5], [0.1, 0.2, 0.6, 0.9]])),
    ("/v1/caption", {"length": "long"}, "caption", ("long",)),
    ("/v1/caption", {"length": "short"}, "caption", ("short",)),
    ("/v1/detect", {"object": "red car"}, "locate", ("red car", "detect")),
    ("/v1/point", {"object": "red car"}, "locate", ("red car", "point")),
])
def test_each_endpoint_builds_the_skills_prompt(live, path, body, skill, args):
    """Greedy text on the fixture is the same whatever the question or length: check the prompt."""
    import httpx

    rec = PromptRecorder(live.md)
    try:
        settings = {"max_objects": 1} if skill == "locate" else {"temperature": 0, "max_tokens": 2}
        r = httpx.post(f"{live.url}{path}", json={"image_url": png_image("wide").image_url, "settings": settings, **body}, timeout=60)
        assert r.status_code == 200
        assert rec.last_text_items() == rec.expected(skill, *args)
    finally:
        del live.md._submit
