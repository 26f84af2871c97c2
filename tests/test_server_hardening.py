"""Requests that could hurt other users get a cheap 4xx and change nothing else."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import threading
import time

import httpx
import pytest
from conftest import LiveServer, golden_cases, golden_image, wait_engine_idle
from PIL import Image, ImageFile

from tidal import EngineConfig, Moondream
from tidal.server.app import create_app
from tidal.server.config import ServerConfig
from tidal.validation import MAX_TEXT_CHARS

WIDE_PNG = golden_image("wide").read_bytes()
WIDE = "data:image/png;base64," + base64.b64encode(WIDE_PNG).decode()
GOOD = {"image_url": WIDE, "question": "what color is the car", "settings": {"temperature": 0, "max_tokens": 16}}
GOOD_ANSWER = next(c for c in golden_cases("query") if c["image"] == "wide" and c["question"] == "what color is the car")["result"]["answer"]


@pytest.fixture(scope="module")
def live(golden_md, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig())
    srv = LiveServer(md, ServerConfig(local_files_root=root))
    srv.root = root
    yield srv
    srv.stop()
    md.close()


def _post(live, path: str, body, timeout: float = 60) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(live.url + path, content=body, headers={"content-type": "application/json"}, timeout=timeout)
    return httpx.post(live.url + path, json=body, timeout=timeout)


def _still_serves(live) -> None:
    r = _post(live, "/v1/query", GOOD)
    assert r.status_code == 200 and r.json()["answer"] == GOOD_ANSWER


def _chat(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": WIDE}}, {"type": "text", "text": text}]}], "max_tokens": 4, **extra}


def _rejected(r: httpx.Response, status: int, message: str) -> str:
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    assert message in msg, msg
    return msg


# -- long text -------------------------------------------------------------------------------
BIG = "a" * 8_000_000
LONG_TEXT = {
    "question": ("/v1/query", dict(GOOD, question=BIG)),
    "object": ("/v1/detect", {"image_url": WIDE, "object": BIG}),
    "chat text": ("/v1/chat/completions", _chat(BIG)),
    "stop string": ("/v1/query", dict(GOOD, settings={"stop": ["x" * 100_000]})),
    "a million stop strings": ("/v1/query", dict(GOOD, settings={"stop": ["ab"] * 1_000_000})),
    "chat stop strings": ("/v1/chat/completions", _chat("hi", stop=["ab"] * 1_000_000)),
}


@pytest.mark.parametrize("name", list(LONG_TEXT))
def test_long_text_is_refused_before_it_is_tokenized(live, name):
    path, body = LONG_TEXT[name]
    t0 = time.perf_counter()
    r = _post(live, path, body)
    assert time.perf_counter() - t0 < 5
    assert r.status_code == 400 and any(s in r.json()["error"]["message"] for s in (str(MAX_TEXT_CHARS), "limit is 256", "at most 16"))
    _still_serves(live)


def test_health_answers_while_a_huge_question_arrives(live):
    done = threading.Event()
    threading.Thread(target=lambda: (_post(live, "/v1/query", dict(GOOD, question=BIG)), done.set()), daemon=True).start()
    t0 = time.perf_counter()
    assert httpx.get(live.url + "/health", timeout=10).status_code == 200
    assert time.perf_counter() - t0 < 2
    assert done.wait(30)


# -- numbers ------------------------------------------------------------------------------------
NUMBERS = {
    "top_k 2**63": ("/v1/query", dict(GOOD, settings={"top_k": 2**63, "temperature": 1}), "top_k must be an integer in [0, 51200]"),
    "top_k above the vocabulary": ("/v1/caption", {"image_url": WIDE, "settings": {"top_k": 51201}}, "top_k"),
    "huge integer temperature": ("/v1/query", dict(GOOD, settings={"temperature": 10**400}), "temperature must be a number in [0, 100]"),
    "temperature 1e308": ("/v1/query", dict(GOOD, settings={"temperature": 1e308}), "temperature"),
    "max_tokens past the context": ("/v1/query", dict(GOOD, settings={"max_tokens": 10**6}), "max_tokens must be an integer in [1, 4096]"),
    "seed past 64 bits": ("/v1/query", dict(GOOD, settings={"seed": 2**64}), "seed"),
    "max_objects past the context": ("/v1/point", {"image_url": WIDE, "object": "dog", "settings": {"max_objects": 10**9}}, "max_objects"),
    "chat top_k 2**63": ("/v1/chat/completions", _chat("hi", top_k=2**63, temperature=1), "top_k"),
    "chat seed": ("/v1/chat/completions", _chat("hi", seed=2**70), "seed"),
}


@pytest.mark.parametrize("name", list(NUMBERS))
def test_out_of_range_numbers_are_400s(live, name):
    path, body, message = NUMBERS[name]
    _rejected(_post(live, path, body), 400, message)
    _still_serves(live)


def test_a_bad_request_batched_with_good_ones_cannot_fail_them(live):
    results: dict[int, httpx.Response] = {}

    def send(i, body):
        results[i] = _post(live, "/v1/query", body)

    bodies = [GOOD] * 6 + [dict(GOOD, settings={"top_k": 2**63, "temperature": 1})] + [GOOD] * 6
    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[6].status_code == 400
    assert all(results[i].status_code == 200 and results[i].json()["answer"] == GOOD_ANSWER for i in results if i != 6)


# -- images ----------------------------------------------------------------------------------------
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _ico_hiding(png: bytes) -> bytes:
    """An ICO whose directory says 256x256 but whose image is `png`."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


@pytest.fixture
def decoded_sizes(monkeypatch):
    """Pixel counts of every image Pillow decodes in this process (the server's too)."""
    sizes: list[int] = []
    load = ImageFile.ImageFile.load

    def counted(self):
        sizes.append(self.width * self.height)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    return sizes


def test_a_small_upload_of_a_huge_image_is_refused_from_its_header(live, decoded_sizes):
    huge = _png(Image.new("1", (8000, 6000)))
    assert len(huge) < 100_000
    r = _post(live, "/v1/caption", {"image_url": "data:image/png;base64," + base64.b64encode(huge).decode()})
    _rejected(r, 400, "8000x6000 = 48000000 pixels; the limit is 16777216")
    assert max(decoded_sizes, default=0) < 8000 * 6000  # refused before any pixel was decoded
    _still_serves(live)


def test_an_icon_hiding_a_huge_png_is_refused(live, decoded_sizes):
    ico = _ico_hiding(_png(Image.new("1", (5000, 5000))))
    assert ico[6:8] == b"\0\0"  # the directory claims 256x256 (0 means 256)
    r = _post(live, "/v1/caption", {"image_url": "data:image/x-icon;base64," + base64.b64encode(ico).decode()})
    _rejected(r, 400, "not a PNG, JPEG, WebP, GIF, BMP or TIFF")
    assert max(decoded_sizes, default=0) < 5000 * 5000


def test_decodes_share_a_pixel_budget():
    from tidal.images import PixelBudget

    budget, peak, lock = PixelBudget(100), [0], threading.Lock()

    def decode(n):
        with budget.reserve(n):
            with lock:
                peak[0] = max(peak[0], budget.used)
            time.sleep(0.02)

    threads = [threading.Thread(target=decode, args=(n,)) for n in [40, 30, 60, 50, 100, 500, 10] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 100 and budget.used == 0


def test_base64_with_line_breaks_and_spaces(live):
    wrapped = base64.encodebytes(WIDE_PNG).decode()  # a newline every 76 characters
    assert "\n" in wrapped
    for payload in (wrapped, wrapped.replace("\n", " ")):
        r = _post(live, "/v1/query", dict(GOOD, image_url="data:image/png;base64," + payload))
        assert r.status_code == 200 and r.json()["answer"] == GOOD_ANSWER


def test_exif_orientation_is_applied(golden_md):
    upright = Image.open(golden_image("wide")).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif)
    a, b = golden_md.encode_image(buf.getvalue()), golden_md.encode_image(upright)
    assert a.key == b.key and (a.embeds == b.embeds).all()


# -- unicode ---------------------------------------------------------------------------------------
SURROGATE = "\\ud800"
SURROGATES = {
    "question": ("/v1/query", '{"image_url": "%s", "question": "what %s"}' % (WIDE, SURROGATE)),
    "object": ("/v1/point", '{"image_url": "%s", "object": "dog%s"}' % (WIDE, SURROGATE)),
    "caption length": ("/v1/caption", '{"image_url": "%s", "length": "%s"}' % (WIDE, SURROGATE)),
    "settings stop": ("/v1/query", '{"image_url": "%s", "question": "hi", "settings": {"stop": ["%s"]}}' % (WIDE, SURROGATE)),
    "chat text": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi %s"}]}' % SURROGATE),
    "chat text part": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "%s"}]}]}' % SURROGATE),
    "chat model": ("/v1/chat/completions", '{"model": "m%s", "messages": [{"role": "user", "content": "hi"}]}' % SURROGATE),
    "chat stop": ("/v1/chat/completions", '{"stop": "%s", "messages": [{"role": "user", "content": "hi"}]}' % SURROGATE),
}


@pytest.mark.parametrize("name", list(SURROGATES))
def test_a_lone_surrogate_is_a_400(live, name):
    path, raw = SURROGATES[name]
    r = _post(live, path, raw.encode())
    _rejected(r, 400, "surrogate")
    _still_serves(live)


# -- the queue bound ------------------------------------------------------------------------------
def test_the_queue_bound_holds_for_a_burst(golden_md):
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig())
    srv = LiveServer(md, ServerConfig(max_queue=4))
    gate, step = threading.Event(), md.engine.step
    md.engine.step = lambda: (gate.wait(), step())[1]
    statuses: list[int] = []
    try:
        def send():
            statuses.append(_post(srv, "/v1/query", GOOD).status_code)

        threads = [threading.Thread(target=send) for _ in range(60)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while len(statuses) < 56 and time.time() < deadline:
            time.sleep(0.02)
        assert md.loop.queue_length() <= 4
        gate.set()
        for t in threads:
            t.join()
        assert statuses.count(200) == 4 and statuses.count(503) == 56
        wait_engine_idle(md)
    finally:
        gate.set()
        srv.stop()
        md.close()


def test_request_threads_bound_the_requests_prepared_at_once(golden_md):
    """ServerConfig(request_threads=2): of six requests sent together, at most
    two are being prepared (validated, image decoded) at any moment, all six
    answer, and /metrics counts each one's preparing time."""
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig())
    srv = LiveServer(md, ServerConfig(request_threads=2))
    lock, busy, most = threading.Lock(), [0], [0]
    submit = md.submit_query

    def slow_submit(*args, **kwargs):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        time.sleep(0.2)  # long enough for the others to pile up
        with lock:
            busy[0] -= 1
        return submit(*args, **kwargs)

    md.submit_query = slow_submit
    statuses: list[int] = []
    try:
        threads = [threading.Thread(target=lambda: statuses.append(_post(srv, "/v1/query", GOOD).status_code)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [200] * 6
        assert most[0] == 2
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'tidal_request_prepare_seconds_count{skill="query"} 6.0' in metrics
        wait_engine_idle(md)
    finally:
        srv.stop()
        md.close()
    with pytest.raises(ValueError, match="request_threads"):
        create_app(golden_md, ServerConfig(request_threads=0))


# -- local files --------------------------------------------------------------------------------------
def _local(live, path: str) -> httpx.Response:
    return _post(live, "/v1/query", dict(GOOD, image_url=path))


def test_local_files_under_the_root_work(live):
    (live.root / "wide.png").write_bytes(WIDE_PNG)
    for url in (str(live.root / "wide.png"), "file://" + str(live.root / "wide.png")):
        r = _local(live, url)
        assert r.status_code == 200 and r.json()["answer"] == GOOD_ANSWER


def test_local_files_outside_the_root_are_refused(live, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(WIDE_PNG)
    link = live.root / "link.png"
    if not link.exists():
        link.symlink_to(outside)
    _rejected(_local(live, str(outside)), 400, "must lie under the folder")
    _rejected(_local(live, str(link)), 400, "must lie under the folder")  # a symlink out
    _rejected(_local(live, f"{live.root}/../{outside.name}"), 400, "'..'")
    _rejected(_local(live, "~/x.png"), 400, "'~'")
    proc = live.root / "environ.png"
    if not proc.exists():
        proc.symlink_to("/proc/self/environ")
    _rejected(_local(live, str(proc)), 400, "must lie under the folder")


def test_missing_and_non_image_files_answer_alike(live):
    (live.root / "notes.png").write_text("not an image at all")
    a = _local(live, str(live.root / "nothing.png")).json()["error"]["message"]
    b = _local(live, str(live.root / "notes.png")).json()["error"]["message"]
    assert a.replace("nothing.png", "X") == b.replace("notes.png", "X")
    assert "no readable image file" in a


def test_special_files_are_refused_cleanly(live):
    fifo = live.root / "pipe.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    t0 = time.perf_counter()
    _rejected(_local(live, str(fifo)), 400, "no readable image file")  # and it did not block on the pipe
    assert time.perf_counter() - t0 < 5
    (live.root / "empty.png").write_bytes(b"")
    _rejected(_local(live, str(live.root / "empty.png")), 400, "no readable image file")


def test_the_size_limit_applies_to_the_resolved_file(golden_md, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(WIDE_PNG + b"\0" * 300_000)
    (tmp_path / "small-name.png").symlink_to(big)
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig())
    srv = LiveServer(md, ServerConfig(local_files_root=tmp_path, max_image_bytes=200_000))
    try:
        _rejected(_local(srv, str(tmp_path / "small-name.png")), 400, "the limit is 200000")
    finally:
        srv.stop()
        md.close()


def test_the_server_reads_proc_files_under_a_root_of_slash_as_unreadable(golden_md):
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig())
    srv = LiveServer(md, ServerConfig(local_files_root="/"))
    try:
        _rejected(_local(srv, "/proc/self/environ"), 400, "no readable image file")
        _rejected(_local(srv, "/dev/zero"), 400, "no readable image file")
    finally:
        srv.stop()
        md.close()


# -- what errors say ------------------------------------------------------------------------------------
def test_errors_name_no_internals(live):
    r = _post(live, "/v1/caption", {"image_url": "data:image/png;base64," + base64.b64encode(b"GIF89a broken").decode()})
    msg = _rejected(r, 400, "could not be decoded")
    assert "0x" not in msg and "object at" not in msg and "<" not in msg and "Error" not in msg


def test_engine_failures_reach_clients_without_internals(golden_md):
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig())
    srv = LiveServer(md)

    def broken(steps, **kw):
        raise RuntimeError("secret internals at 0xdeadbeef")

    md.engine.runner.run = broken
    try:
        r = _post(srv, "/v1/query", GOOD)
        msg = _rejected(r, 500, "internal error while running request")
        assert "0xdead" not in msg and "RuntimeError" not in msg and "secret" not in msg
        with httpx.stream("POST", srv.url + "/v1/query", json=dict(GOOD, stream=True), timeout=60) as s:
            body = "".join(s.iter_text())
        assert "internal error" in body and "secret" not in body and "RuntimeError" not in body
    finally:
        srv.stop()
        md.close()


# -- OpenAI options this server cannot honour ---------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    {"logprobs": True},
    {"logprobs": True, "top_logprobs": 3},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"tool_choice": "required"},
    {"response_format": {"type": "json_object"}},
    {"logit_bias": {"5": 10}},
    {"frequency_penalty": 0.5},
], ids=lambda e: ",".join(e))
def test_unsupported_openai_options_are_refused_not_ignored(live, extra):
    _rejected(_post(live, "/v1/chat/completions", _chat("hi", **extra)), 400, "not supported by this server")


def test_harmless_defaults_of_those_options_are_accepted(live):
    r = _post(live, "/v1/chat/completions", _chat("what color is the car", temperature=0, max_tokens=16, logprobs=False, response_format={"type": "text"}, tool_choice="none", frequency_penalty=0))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == GOOD_ANSWER


def test_error_bodies_are_json(live):
    r = _post(live, "/v1/query", b'{"question": ')
    assert json.loads(r.text)["error"]["type"] == "invalid_request_error"


def test_base64_bodies_decode_exactly():
    """The server decodes image data URLs with numpy's loops past
    NUMPY_MIN_CHARS (the GIL free for the engine's thread), with binascii
    below: the bytes equal one binascii decode's either side of the
    threshold; bad data is refused as before, in either form."""
    import base64
    import os

    import pytest

    from tidal.base64_decode import NUMPY_MIN_CHARS
    from tidal.errors import ImageError
    from tidal.server import images
    from tidal.server.config import ServerConfig

    config = ServerConfig()
    edge = 3 * NUMPY_MIN_CHARS // 4
    for n in (0, 1, 2, 3, edge - 1, edge, edge + 1, edge + 2, 700_001):
        raw = os.urandom(n)
        text = base64.b64encode(raw).decode()
        assert images._base64(text, config).decode() == raw
        assert images._base64("\n".join(text[i : i + 76] for i in range(0, len(text), 76)), config).decode() == raw  # MIME line breaks
    good = base64.b64encode(os.urandom(4 * NUMPY_MIN_CHARS)).decode()
    for bad in (good[:100] + "!" + good[101:], good + "A", good[:-8] + "=" + good[-7:], good[:5000] + "é" + good[5001:], "=" + good[1:]):
        with pytest.raises(ImageError, match="not valid base64"):
            images._base64(bad, config).decode()
