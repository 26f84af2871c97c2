"""Shared fixtures: the golden reference checkpoint and a model loaded from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run under Triton's interpreter on the CPU (tests/test_kernels.py);
    # this must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _let_triton_interpreter_index_with_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a
    Python int with int(array), which numpy 2.4 refuses; take the element."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _let_triton_interpreter_index_with_numpy_2_4()

GOLDEN = Path(__file__).parent / "data" / "moondream3-tiny"
SHARED_GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "moondream3-tiny"


def golden_cases(kind: str | None = None) -> list[dict]:
    cases = json.loads((GOLDEN / "expected.json").read_text())["cases"]
    return [c for c in cases if kind is None or c["kind"] == kind]


def golden_image(name: str | None) -> Path | None:
    return None if name is None else GOLDEN / "images" / f"{name}.png"


def case_id(c: dict) -> str:
    bits = [c["kind"], str(c.get("image"))]
    for key in ("question", "object", "length"):
        if key in c:
            bits.append(str(c[key]).replace(" ", "_"))
    if c.get("reasoning"):
        bits.append("reasoning")
    if c.get("spatial_refs"):
        bits.append("refs")
    if "max_objects" in c.get("settings", {}):
        bits.append(f"max{c['settings']['max_objects']}")
    return "-".join(bits)


@pytest.fixture(scope="session")
def golden_md():
    """Moondream on the golden checkpoint, float32 on the CPU, shared by all tests."""
    import tidal

    md = tidal.Moondream.from_pretrained(GOLDEN, device="cpu", dtype="float32")
    yield md
    md.close()


@pytest.fixture(scope="session")
def tiny_md(tmp_path_factory):
    """The embedded tiny model (random weights), float32 on the CPU. Its greedy
    text runs on without an end token, so a request stays busy as long as a
    test needs: the model for cancellation tests."""
    import tidal
    from tidal.models.moondream3.tiny import ensure_tiny_checkpoint

    md = tidal.Moondream.from_pretrained(ensure_tiny_checkpoint(tmp_path_factory.mktemp("cache")), device="cpu")
    yield md
    md.close()


LONG_TEXT = {"temperature": 0, "max_tokens": 3000}  # with tiny_md: runs to max_tokens unless cancelled


@pytest.fixture(scope="session")
def golden_encoded(golden_md):
    """Each golden image encoded once."""
    return {name: golden_md.encode_image(golden_image(name)) for name in ("square378", "wide", "tall", "big", "tiny")}


def run_case(md, case: dict, image):
    """Run one golden skill case; `image` is what to pass as the image."""
    kind, settings = case["kind"], case["settings"]
    if kind == "query":
        return md.query(image, case["question"], reasoning=case["reasoning"], spatial_refs=case.get("spatial_refs"), settings=settings)
    if kind == "caption":
        return md.caption(image, case["length"], settings=settings)
    if kind == "detect":
        return md.detect(image, case["object"], settings=settings)
    return md.point(image, case["object"], settings=settings)


def prepare_case(md, case: dict, image=None):
    """A golden skill case as the engine takes it: (skill, items, bidir_len).
    image: what to pass as the image (default: the case's image file)."""
    img = (None if case["image"] is None else golden_image(case["image"])) if image is None else image
    kind = case["kind"]
    if kind == "query":
        return md._prepare_query(img, case["question"], case["reasoning"], case.get("spatial_refs"), case["settings"])
    if kind == "caption":
        return md._prepare_caption(img, case["length"], case["settings"])
    return md._prepare_locate(img, case["object"], case["settings"], kind == "detect")


def distinct_image_cases(cases: list[dict]) -> list[dict]:
    """The first case of each image (no request then waits on another's image prefix)."""
    seen: set = set()
    out = []
    for c in cases:
        if c["image"] is not None and c["image"] not in seen:
            seen.add(c["image"])
            out.append(c)
    return out


def run_together_counting_encodes_ahead(md, cases: list[dict]) -> tuple[list, int]:
    """All cases added at once on the engine thread and stepped to the end;
    -> (their Requests, images the engine encoded ahead of their steps)."""
    from tidal.engine.request import Request

    reqs = [Request(skill=skill, pending=items, bidir_len=bidir) for skill, items, bidir in (prepare_case(md, c) for c in cases)]

    def run(engine) -> int:
        encoded = []
        encode_ahead = engine._encode_ahead
        engine._encode_ahead = lambda: encoded.append(encode_ahead()) or encoded[-1]
        try:
            for r in reqs:
                engine.add_request(r)
            while not all(r.finished for r in reqs):
                engine.step()
        finally:
            del engine._encode_ahead
        return sum(encoded)

    return reqs, md.loop.call(run)


def finished_request(md, case: dict):
    """Run a golden case to the end through md; -> its Request (result, trace)."""
    handle = md._submit(*prepare_case(md, case))
    handle.wait()
    return handle.request


def assert_matches_golden(result: dict, case: dict) -> None:
    """Texts and grounding exactly, coordinates within 1e-5, same counts."""
    got = json.loads(json.dumps(result))
    want = case["result"]
    if case["kind"] in ("detect", "point"):
        key = "objects" if case["kind"] == "detect" else "points"
        assert len(got[key]) == len(want[key]), (got, want)
        for g, w in zip(got[key], want[key]):
            assert set(g) == set(w)
            for k in w:
                assert abs(g[k] - w[k]) <= 1e-5, (k, g, w)
    else:
        assert got == want


def rel(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def assert_same_traces(got, want, tol: float = 1e-6) -> None:
    """Two requests' outputs agree: every output's raw logits (text, coordinate,
    size) within tol relative, and the same final result; neither failed."""
    assert got.error is None and want.error is None
    assert len(got.trace) == len(want.trace) > 0
    for step, (g, w) in enumerate(zip(got.trace, want.trace)):
        for name in ("logits", "coord", "size"):
            err = rel(getattr(g, name), getattr(w, name))
            assert err <= tol, f"{got.skill.name} step {step}: {name} differ by {err:.2e} relative"
    assert got.skill.result() == want.skill.result()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def assert_engine_idle(engine) -> None:
    """No request left and no KV page leaked: every page is free or held,
    unlocked, by the prefix cache."""
    assert not engine.has_work()
    usage = engine.kv_usage()
    assert usage["requests"] == 0
    assert usage["cached"] == usage["cached_unused"]
    assert usage["free"] + usage["cached"] == usage["capacity"]
    assert engine.req_to_token.available == engine.req_to_token.max_requests


class PromptRecorder:
    """Records what a Moondream instance submits: (skill, items, bidir) per request.
    The fixture's greedy text is the same for every question and caption length,
    so tests of routes check the prompts themselves."""

    def __init__(self, md) -> None:
        self.md, self.calls = md, []
        submit = md._submit

        def recorded(skill, items, bidir):
            self.calls.append((skill, list(items), bidir))
            return submit(skill, items, bidir)

        md._submit = recorded

    def last_text_items(self) -> list:
        """The last request's items after its image prefix (all of them when text-only)."""
        _, items, bidir = self.calls[-1]
        return items[2:] if bidir else items

    def expected(self, skill: str, *args) -> list:
        """What PromptBuilder gives for the same skill and text, after the image prefix."""
        import torch

        from tidal.core import ImageInput

        image = ImageInput(torch.zeros(729, 1), "x")
        build = getattr(self.md.prompts, skill)
        items, _ = build(image, *args)
        return items[2:]


class LiveServer:
    """`tidal serve`'s app on a free local port, in a background thread."""

    def __init__(self, md, config=None, app=None) -> None:
        import asyncio
        import socket
        import threading

        import uvicorn

        from tidal.server.app import create_app

        self.md = md
        self.app = app if app is not None else create_app(md, config)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_keep_alive=30))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        import time

        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def wait_finished(req, timeout: float = 20.0) -> None:
    """Wait until a request has finished (however it ended)."""
    import time

    deadline = time.time() + timeout
    while not req.finished:
        assert time.time() < deadline, f"{req.id} did not finish"
        time.sleep(0.01)


def wait_engine_idle(md, timeout: float = 20.0) -> None:
    """Wait until the engine has finished (or cancelled) everything, then check
    no page leaked and no request handle is left behind."""
    import time

    deadline = time.time() + timeout
    while md.loop.in_flight() or md.engine.has_work():
        assert time.time() < deadline, f"engine still busy: {md.engine.snapshot()}"
        time.sleep(0.02)
    assert_engine_idle(md.engine)
    assert not md.loop._handles


@pytest.fixture(autouse=True)
def _engines_end_idle(request):
    """After every test that used a shared engine: nothing left running, no page leaked."""
    yield
    for name in ("golden_md", "tiny_md", "live", "tiny_live"):
        if name in request.fixturenames:
            obj = request.getfixturevalue(name)
            wait_engine_idle(getattr(obj, "md", obj))
