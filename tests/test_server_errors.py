"""Bad requests get a clear 4xx/503 and the server keeps serving; nothing leaks."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import LiveServer, golden_cases, golden_image, wait_engine_idle
from PIL import Image

from tidal import EngineConfig, Moondream
from tidal.server.config import ServerConfig

LIMITS = ServerConfig(max_body_bytes=4_000_000, max_image_bytes=1_600_000, max_image_pixels=1_100_000, max_queue=64)
WIDE = "data:image/png;base64," + base64.b64encode(golden_image("wide").read_bytes()).decode()
GOOD = {"image_url": WIDE, "question": "what color is the car", "settings": {"temperature": 0, "max_tokens": 16}}
GOOD_ANSWER = next(c for c in golden_cases("query") if c["image"] == "wide" and c["question"] == "what color is the car")["result"]["answer"]


@pytest.fixture(scope="module")
def live(golden_md):
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig())
    srv = LiveServer(md, LIMITS)
    yield srv
    srv.stop()
    md.close()


def _png(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(text: str, image: str | None = WIDE) -> dict:
    content = ([{"type": "image_url", "image_url": {"url": image}}] if image else []) + [{"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4}


BAD = {
    "malformed JSON": ("/v1/query", b'{"question": "hi", ', 400, "malformed JSON"),
    "missing field": ("/v1/query", {"image_url": WIDE}, 400, "question: Field required"),
    "wrong type": ("/v1/caption", {"image_url": WIDE, "stream": "sometimes"}, 400, "stream"),
    "bad base64": ("/v1/caption", {"image_url": "data:image/png;base64,@@@@"}, 400, "not valid base64"),
    "not an image": ("/v1/caption", {"image_url": "data:image/png;base64," + base64.b64encode(b"hello world, not pixels").decode()}, 400, "could not be decoded"),
    "remote URL": ("/v1/caption", {"image_url": "https://example.com/cat.jpg"}, 400, "not fetched"),
    "local path not allowed": ("/v1/caption", {"image_url": str(golden_image("wide"))}, 400, "local file paths are off"),
    "too many pixels": ("/v1/point", {"image_url": _png(np.zeros((1100, 1100, 3), np.uint8)), "object": "dog"}, 400, "the limit is 1100000"),
    "too many image bytes": ("/v1/point", {"image_url": _png(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)), "object": "dog"}, 400, "the limit is 1600000"),
    "unknown caption length": ("/v1/caption", {"image_url": WIDE, "length": "medium"}, 400, "unknown caption length"),
    "out-of-range temperature": ("/v1/query", dict(GOOD, settings={"temperature": -1}), 400, "temperature must be"),
    "out-of-range top_p": ("/v1/query", dict(GOOD, settings={"top_p": 2}), 400, "top_p must be"),
    "max_tokens 0": ("/v1/caption", {"image_url": WIDE, "settings": {"max_tokens": 0}}, 400, "max_tokens must be"),
    "max_objects 0": ("/v1/detect", {"image_url": WIDE, "object": "dog", "settings": {"max_objects": 0}}, 400, "max_objects must be"),
    "empty question": ("/v1/query", dict(GOOD, question=""), 400, "question must not be empty"),
    "bad spatial refs": ("/v1/query", dict(GOOD, spatial_refs=[[0.5, 2.0]]), 400, r"in [0, 1]"),
    "unknown skill prefix": ("/v1/chat/completions", _chat("segment: the dog"), 400, "unknown skill prefix 'segment'"),
    "unknown caption length (chat)": ("/v1/chat/completions", _chat("caption: medium"), 400, "unknown caption length"),
    "detect without image": ("/v1/chat/completions", _chat("detect: dog", image=None), 400, "detect needs an image"),
    "two images": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": WIDE}}] * 2}]}, 400, "one image per request"),
    "n > 1": ("/v1/chat/completions", dict(_chat("hi"), n=2), 400, "n must be 1"),
    "bad chat temperature": ("/v1/chat/completions", dict(_chat("hi"), temperature=-2), 400, "temperature must be"),
    "segment": ("/v1/segment", {"image_url": WIDE, "object": "dog"}, 400, "not a Moondream 3 skill"),
    "unknown route": ("/v1/nothing", {}, 404, "Not Found"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_is_rejected_and_the_server_keeps_serving(live, name):
    path, body, status, message = BAD[name]
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(live.url + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"]
    ok = httpx.post(live.url + "/v1/query", json=GOOD, timeout=60)
    assert ok.status_code == 200 and ok.json()["answer"] == GOOD_ANSWER
    wait_engine_idle(live.md)


def test_body_over_the_limit_is_413(live):
    big = {"image_url": "data:image/png;base64," + "A" * 4_100_000, "question": "hi"}
    r = httpx.post(live.url + "/v1/query", json=big, timeout=60)
    assert r.status_code == 413 and "over the limit of 4000000 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b" " * 1_000_000

    r = httpx.post(live.url + "/v1/query", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert httpx.post(live.url + "/v1/query", json=GOOD, timeout=60).json()["answer"] == GOOD_ANSWER


def test_overload_gets_503_with_retry_after(golden_md):
    """With the engine busy (held inside a step), one request may wait; the next is turned away."""
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig())
    srv = LiveServer(md, ServerConfig(max_queue=1, retry_after_s=2))
    gate, step = threading.Event(), md.engine.step
    md.engine.step = lambda: (gate.wait(), step())[1]
    try:
        results: list[httpx.Response] = []
        first = threading.Thread(target=lambda: results.append(httpx.post(srv.url + "/v1/query", json=GOOD, timeout=60)))
        first.start()
        deadline = time.time() + 20
        while md.loop.queue_length() < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        r = httpx.post(srv.url + "/v1/query", json=GOOD, timeout=60)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "2" and r.json()["error"]["type"] == "overloaded"
        assert "1 requests waiting" in r.json()["error"]["message"]
        gate.set()  # the engine moves again: the waiting request completes, new ones are accepted
        first.join()
        assert results[0].status_code == 200 and results[0].json()["answer"] == GOOD_ANSWER
        assert httpx.post(srv.url + "/v1/query", json=GOOD, timeout=60).json()["answer"] == GOOD_ANSWER
        wait_engine_idle(md)
    finally:
        gate.set()
        srv.stop()
        md.close()


@pytest.fixture(scope="module")
def tiny_live(tiny_md):
    """A server on the embedded tiny model, whose text runs on until cancelled."""
    md = Moondream(tiny_md.model, tiny_md.tokenizer, EngineConfig())
    srv = LiveServer(md)
    yield srv
    srv.stop()
    md.close()


def _cancelled(live, skill: str) -> float:
    text = httpx.get(live.url + "/metrics").text
    line = f'tidal_requests_total{{skill="{skill}",status="cancelled"}}'
    return next((float(l.split()[-1]) for l in text.splitlines() if l.startswith(line)), 0.0)


LONG = {"temperature": 0, "max_tokens": 3000}


@pytest.mark.parametrize("path, skill, body", [
    ("/v1/caption", "caption", {"image_url": WIDE, "length": "long", "stream": True, "settings": LONG}),
    ("/v1/query", "query", {"question": "tell me a story", "stream": True, "settings": LONG}),
    ("/v1/chat/completions", "query", {"messages": [{"role": "user", "content": "tell me a story"}], "stream": True, "temperature": 0, "max_tokens": 3000}),
])
def test_disconnect_mid_stream_cancels_and_frees(tiny_live, path, skill, body):
    md = tiny_live.md
    before = _cancelled(tiny_live, skill)
    with httpx.Client(timeout=60) as c, c.stream("POST", tiny_live.url + path, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert md.loop.in_flight() == 1  # still generating when the client leaves
    wait_engine_idle(md, timeout=20)  # long before 3000 tokens; also: no handle left behind
    assert _cancelled(tiny_live, skill) == before + 1


def test_disconnect_while_waiting_for_a_plain_response_cancels(tiny_live):
    before = _cancelled(tiny_live, "caption")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_live.url + "/v1/caption", json={"image_url": WIDE, "length": "long", "settings": LONG}, timeout=1.0)
    wait_engine_idle(tiny_live.md, timeout=20)
    assert _cancelled(tiny_live, "caption") == before + 1


def test_metrics_and_health(live):
    assert httpx.post(live.url + "/v1/query", json=GOOD, timeout=60).status_code == 200
    assert httpx.post(live.url + "/v1/query", json=dict(GOOD, question=""), timeout=60).status_code == 400
    text = httpx.get(live.url + "/metrics").text
    for name in ("tidal_requests_total", "tidal_prompt_tokens_total", "tidal_generated_tokens_total", "tidal_time_to_first_token_seconds_bucket",
                 "tidal_request_latency_seconds_bucket", "tidal_queue_length", "tidal_kv_pages_used", "tidal_prefix_cache_hit_rate"):
        assert name in text, name
    assert 'tidal_requests_total{skill="query",status="ok"}' in text
    assert 'tidal_requests_total{skill="query",status="invalid"}' in text
    hit = next(float(l.split()[-1]) for l in text.splitlines() if l.startswith("tidal_prefix_cache_hit_rate"))
    assert 0 < hit <= 1  # the same image was asked about again
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["queue_length"] == 0
