"""Load: 64 concurrent clients, mixed skills, repeated and new images. Every
response must equal the same request's result when run alone; none lost,
none duplicated."""

from __future__ import annotations

import base64
import io
import statistics
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import LiveServer, golden_image, wait_engine_idle
from PIL import Image

from tidal import EngineConfig, Moondream

CLIENTS = 64
PER_CLIENT = 2
GREEDY = {"temperature": 0, "max_tokens": 16}


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _images() -> list[str]:
    golden = [_data_url(golden_image(n).read_bytes()) for n in ("square378", "wide", "tall", "big")]
    rng = np.random.default_rng(42)
    new = []
    for i in range(8):  # images no request has seen before
        h, w = int(rng.integers(200, 900)), int(rng.integers(200, 900))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        new.append(_data_url(buf.getvalue()))
    return golden + new


def _requests() -> list[tuple[str, dict]]:
    images = _images()
    out = []
    for i in range(CLIENTS * PER_CLIENT):
        img = images[i % len(images)]
        kind = i % 8
        if kind == 0:
            out.append(("/v1/query", {"image_url": img, "question": "what color is the car", "settings": GREEDY}))
        elif kind == 1:
            out.append(("/v1/query", {"image_url": img, "question": "how many people are there", "reasoning": True, "settings": GREEDY}))
        elif kind == 2:
            out.append(("/v1/query", {"image_url": img, "question": "describe this image", "spatial_refs": [[0.2, 0.3], [0.1, 0.1, 0.5, 0.6]], "settings": GREEDY}))
        elif kind == 3:
            out.append(("/v1/caption", {"image_url": img, "length": ["short", "normal", "long"][i % 3], "settings": GREEDY}))
        elif kind == 4:
            out.append(("/v1/detect", {"image_url": img, "object": "dog", "settings": {"max_objects": 5}}))
        elif kind == 5:
            out.append(("/v1/point", {"image_url": img, "object": "red car", "settings": {"max_objects": 5}}))
        elif kind == 6:
            content = [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": "detect: dog"}]
            out.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": content}]}))
        else:
            out.append(("/v1/query", {"question": f"what is {i}", "settings": GREEDY}))  # text only
    return out


def _payload(path: str, body: dict) -> object:
    """The part of a response that must not depend on what else ran."""
    if path == "/v1/chat/completions":
        return body["choices"][0]["message"]["content"]
    return {k: v for k, v in body.items() if k != "request_id"}


@pytest.fixture(scope="module")
def live(golden_md):
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(max_running=64))
    srv = LiveServer(md)
    yield srv
    srv.stop()
    md.close()


def test_64_concurrent_clients(live, capsys):
    reqs = _requests()
    results: list[tuple[int, httpx.Response, float] | None] = [None] * len(reqs)
    start = threading.Barrier(CLIENTS)

    def client(c: int) -> None:
        with httpx.Client(base_url=live.url, timeout=600) as http:
            start.wait()
            for k in range(PER_CLIENT):
                i = c * PER_CLIENT + k
                t0 = time.perf_counter()
                r = http.post(reqs[i][0], json=reqs[i][1])
                results[i] = (i, r, time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    snap = live.md.engine.snapshot()
    max_batch = live.md.engine.stats.max_batch

    assert all(r is not None for r in results), "a request got no response"
    assert all(r.status_code == 200 for _, r, _ in results), [r.text for _, r, _ in results if r.status_code != 200][:3]
    ids = [r.json().get("request_id") or r.json().get("id") for _, r, _ in results]
    assert len(set(ids)) == len(reqs), "duplicated responses"
    wait_engine_idle(live.md)

    # the same requests one at a time, with a cold cache
    live.md.clear_cache()
    with httpx.Client(base_url=live.url, timeout=600) as http:
        alone = [http.post(path, json=body).json() for path, body in reqs]
    for (path, _), (_, r, _), solo in zip(reqs, results, alone):
        assert _payload(path, r.json()) == _payload(path, solo), path

    lat = sorted(s for _, _, s in results)
    hit = snap["cache_hit_positions"] / max(1, snap["cache_lookup_positions"])
    with capsys.disabled():
        print(
            f"\n[load] {len(reqs)} requests from {CLIENTS} concurrent clients in {wall:.1f} s "
            f"({len(reqs) / wall:.1f} req/s); latency p50 {statistics.median(lat):.2f} s, "
            f"p95 {lat[int(0.95 * len(lat)) - 1]:.2f} s, max {lat[-1]:.2f} s; "
            f"largest batch {max_batch}; prefix-cache hit rate {hit:.0%}; preemptions {snap['preemptions']}"
        )
    assert max_batch >= 32  # many requests really shared steps
