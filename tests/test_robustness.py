"""The Python API survives its users: failures stay with the request at fault,
dead listeners and dropped streams cost nothing, cancellation really cancels,
and a crashed engine fails everyone promptly instead of hanging them."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import (
    LONG_TEXT,
    assert_matches_golden,
    golden_cases,
    golden_image,
    run_case,
    wait_finished,
)

from tidal import EngineConfig, InvalidRequestError, Moondream
from tidal.engine.loop import RequestCancelled, RequestError

WIDE_QUERY = next(c for c in golden_cases("query") if c["image"] == "wide" and not c["reasoning"] and not c.get("spatial_refs"))
STORY = "tell me a story"


@pytest.fixture
def tiny(tiny_md):
    """A fresh engine on the tiny model (so a crash or a gate stays in this test)."""
    md = Moondream(tiny_md.model, tiny_md.tokenizer, EngineConfig())
    yield md
    md.close()


def test_the_tiny_model_runs_to_max_tokens_unless_stopped(tiny_md):
    handle = tiny_md.submit_query(None, STORY, settings=dict(LONG_TEXT, max_tokens=40))
    handle.wait()
    assert handle.request.skill.finish_reason == "length" and handle.request.skill.completion_tokens == 40


def test_cancel_ends_a_long_request_long_before_max_tokens(tiny_md):
    handle = tiny_md.submit_query(None, STORY, settings=LONG_TEXT)
    events = handle.events()
    next(events)  # it is generating
    handle.cancel()
    with pytest.raises(RequestCancelled, match="was cancelled"):
        handle.wait()
    skill = handle.request.skill
    assert skill.finish_reason == "cancelled" and skill.completion_tokens < 300


def test_closing_a_stream_early_cancels(tiny_md):
    out = tiny_md.caption(golden_image("wide"), "long", stream=True, settings=LONG_TEXT)
    stream = out["caption"]
    req = stream._handle.request
    next(stream)
    stream.close()
    wait_finished(req)
    assert req.cancelled and req.skill.completion_tokens < 300


def test_a_stream_dropped_unread_is_cancelled(tiny_md):
    out = tiny_md.query(None, STORY, stream=True, settings=LONG_TEXT)
    req = out["answer"]._handle.request
    del out
    gc.collect()
    wait_finished(req)
    assert req.cancelled and req.skill.completion_tokens < 300


def test_a_listener_whose_event_loop_closed_does_not_kill_the_engine(tiny):
    handle = tiny.submit_query(None, STORY, settings=dict(LONG_TEXT, max_tokens=200))

    async def first_event():
        async for event in handle.aevents():
            return event

    assert asyncio.run(first_event())[0] == "text"  # that loop is closed now; events keep coming
    other = tiny.submit_query(None, "hello", settings={"temperature": 0, "max_tokens": 5})
    wait_finished(other.request)
    assert other.wait()["answer"] and tiny.loop.crashed is None
    wait_finished(handle.request)
    assert handle.request.skill.finish_reason == "length"


def test_a_crashed_engine_fails_every_pending_request_promptly(tiny):
    handles = [tiny.submit_query(None, STORY, settings=LONG_TEXT) for _ in range(3)]
    step, calls = tiny.engine.step, []

    def broken_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("engine bug")
        return step()

    tiny.engine.step = broken_step
    handles.append(tiny.submit_query(None, STORY, settings=LONG_TEXT))
    t0 = time.time()
    for h in handles:
        with pytest.raises(RequestError, match="engine bug"):
            h.wait()
    assert time.time() - t0 < 10
    with pytest.raises(RequestError, match="engine loop stopped"):
        tiny.submit_query(None, STORY)


def test_a_bad_value_that_slips_through_fails_only_its_request(golden_md):
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(token_budget=60_000))
    try:
        cases = [c for c in golden_cases("query") if c["image"] in ("wide", "tall")][:4]
        bad = md._prepare_query(golden_image("wide"), "what", False, None, {"temperature": 1.0})
        bad[0].params.top_k = 2**63  # past validation, as a bug might let it
        jobs = [md._prepare_query(golden_image(c["image"]), c["question"], c["reasoning"], c.get("spatial_refs"), c["settings"]) for c in cases]
        handles = [md._submit(*j) for j in jobs[:2]] + [md._submit(*bad)] + [md._submit(*j) for j in jobs[2:]]
        with pytest.raises(RequestError):
            handles[2].wait()
        for h, c in zip(handles[:2] + handles[3:], cases):
            assert_matches_golden(h.wait(), c)
        assert md.engine.stats.max_batch >= 5  # the bad one was batched with the others
    finally:
        md.close()


def test_numpy_scalars_are_accepted_where_numbers_are(golden_md, golden_encoded):
    settings = {"temperature": np.float32(0.0), "max_tokens": np.int64(16), "top_p": np.float64(0.9), "top_k": np.int32(0)}
    assert golden_md.query(golden_encoded["wide"], WIDE_QUERY["question"], settings=settings) == WIDE_QUERY["result"]
    refs_case = next(c for c in golden_cases("query") if c["image"] == "wide" and c.get("spatial_refs"))
    refs = [[np.float32(v) for v in r] for r in refs_case["spatial_refs"]]
    assert run_case(golden_md, dict(refs_case, spatial_refs=refs), golden_encoded["wide"]) == refs_case["result"]
    det = next(c for c in golden_cases("detect") if c["image"] == "wide")
    assert_matches_golden(golden_md.detect(golden_encoded["wide"], det["object"], {"max_objects": np.int64(det["settings"]["max_objects"])}), det)


@pytest.mark.parametrize("config", [{"max_running": 0}, {"kv_pages": 1}, {"token_budget": 0}, {"kv_memory_fraction": 0.0}, {"max_running": 2.5}])
def test_engine_config_refuses_what_would_hang(config):
    with pytest.raises(InvalidRequestError):
        EngineConfig(**config)


def test_serve_refuses_zero_running_requests_at_once():
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "tidal", "serve", "--max-running", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--max-running" in out.stderr and "at least 1" in out.stderr
    assert time.time() - t0 < 30


def test_serve_options_reach_the_engine_config():
    from tidal.cli import build_parser, engine_config

    parser = build_parser()
    default = engine_config(parser.parse_args(["serve"]))
    assert default.skinny_gemm == "auto" and default.warm_prefill and default.cuda_graphs and default.prefill_graphs and default.prefix_cache
    assert not default.encode_ahead and default.overlap is None and default.kv_dtype == "auto"
    cfg = engine_config(parser.parse_args(["serve", "--skinny-gemm", "off", "--no-warm-prefill", "--no-cuda-graphs", "--no-prefill-graphs", "--encode-ahead", "--no-overlap", "--max-running", "3", "--kv-dtype", "fp8"]))
    assert cfg.skinny_gemm == "off" and not cfg.warm_prefill and not cfg.cuda_graphs and not cfg.prefill_graphs and cfg.max_running == 3
    assert cfg.encode_ahead and cfg.overlap is False and cfg.kv_dtype == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--skinny-gemm", "sometimes"])
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--kv-dtype", "int4"])


def test_serve_options_reach_the_server_config():
    from tidal.cli import build_parser, server_config

    parser = build_parser()
    default = server_config(parser.parse_args(["serve"]), "m")
    assert default.request_threads is None and default.max_queue == 256 and default.model_name == "m"
    cfg = server_config(parser.parse_args(["serve", "--request-threads", "8", "--max-queue", "9", "--max-body-mb", "2"]), "m")
    assert cfg.request_threads == 8 and cfg.max_queue == 9 and cfg.max_body_bytes == 2 * 1024 * 1024
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--request-threads", "0"])


def test_serve_refuses_a_kv_fraction_past_one():
    out = subprocess.run([sys.executable, "-m", "tidal", "serve", "--kv-memory-fraction", "1.5"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "kv_memory_fraction must be a number in (0, 1]" in out.stderr
