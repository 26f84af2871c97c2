"""Continuous batching, the image-aware prefix cache, chunked prefill and preemption."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_engine_idle,
    assert_matches_golden,
    distinct_image_cases,
    golden_cases,
    golden_image,
    run_case,
    run_together_counting_encodes_ahead,
)

from tidal import EngineConfig, Moondream, PromptTooLongError
from tidal.core import item_len
from tidal.engine.request import Request

SKILL_CASES = [c for c in golden_cases() if c["kind"] in ("query", "caption", "detect", "point")]
TALL_QUERY = next(c for c in golden_cases("query") if c["image"] == "tall" and not c["reasoning"] and not c.get("spatial_refs"))


@pytest.fixture
def fresh(golden_md):
    """A new engine around the already loaded golden model."""
    made = []

    def make(**config) -> Moondream:
        md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(**config))
        made.append(md)
        return md

    yield make
    for md in made:
        assert_engine_idle(md.engine)
        md.close()


class Counter:
    """Counts vision-encoder runs and positions fed to the model."""

    def __init__(self, md: Moondream) -> None:
        self.encodes = self.positions = 0
        runner = md.engine.runner
        encode, run = runner.encode_images, runner.run

        def counted_encode(payloads):
            self.encodes += len(payloads)
            return encode(payloads)

        def counted_run(steps, **kw):
            self.positions += sum(item_len(i) for s in steps for i in s.items)
            return run(steps, **kw)

        runner.encode_images, runner.run = counted_encode, counted_run


def test_second_request_on_an_image_skips_encoder_and_image_prefill(fresh):
    md = fresh()
    count = Counter(md)
    handle = md.submit_query(golden_image("tall"), TALL_QUERY["question"], settings=TALL_QUERY["settings"])
    assert_matches_golden(handle.wait(), TALL_QUERY)
    assert count.encodes == 1 and handle.request.cached_prompt_tokens == 0
    first_positions = count.positions

    other = next(c for c in golden_cases("detect") if c["image"] == "tall")
    count.positions = 0
    handle = md.submit_detect(golden_image("tall"), other["object"], other["settings"])
    assert_matches_golden(handle.wait(), other)
    assert count.encodes == 1  # the vision encoder did not run again
    # BOS, the 729 image positions and the first template token (both templates start with 1)
    assert handle.request.cached_prompt_tokens == 731
    assert count.positions < first_positions - 700


def test_a_repeated_prompt_reuses_all_but_its_last_token(fresh):
    md = fresh()
    for attempt in range(2):
        handle = md.submit_query(golden_image("tall"), TALL_QUERY["question"], settings=TALL_QUERY["settings"])
        assert_matches_golden(handle.wait(), TALL_QUERY)
    req = handle.request
    assert req.cached_prompt_tokens == req.prompt_tokens - 1


def test_cache_off_gives_the_same_results(fresh):
    md = fresh(prefix_cache=False)
    count = Counter(md)
    for case in [c for c in SKILL_CASES if c["image"] == "wide"][:6]:
        assert_matches_golden(run_case(md, case, golden_image("wide")), case)
    assert count.encodes == 6


def test_lru_eviction_under_a_small_cache(fresh):
    # room for about two images' prefixes: later images evict earlier ones
    md = fresh(kv_pages=2000)
    count = Counter(md)
    cases = [next(c for c in SKILL_CASES if c["image"] == name and c["kind"] == "caption") for name in ("tall", "wide", "square378", "tall")]
    for case in cases:
        assert_matches_golden(run_case(md, case, golden_image(case["image"])), case)
    assert count.encodes == 4  # "tall" was evicted by the time it came back
    assert md.engine.prefix_cache.size <= 2000
    md.engine.clear_prefix_cache()
    assert md.engine.kv_usage()["free"] == md.engine.kv_usage()["capacity"]


def test_results_are_the_same_among_fifty_others(fresh, golden_md, golden_encoded):
    # a budget that takes every prompt at once, so all 60 share the first steps
    md = fresh(max_running=64, token_budget=60_000)
    cases = [c for c in SKILL_CASES if c["image"] in ("tall", "wide", "square378", None)]
    cases = (cases * 2)[:60]
    encoded = {k: md.encode_image(golden_image(k)) for k in ("tall", "wide", "square378")}
    handles = []
    for i, case in enumerate(cases):
        img = None if case["image"] is None else encoded[case["image"]]
        if case["kind"] == "query":
            handles.append(md.submit_query(img, case["question"], case["reasoning"], case.get("spatial_refs"), case["settings"]))
        elif case["kind"] == "caption":
            handles.append(md.submit_caption(img, case["length"], case["settings"]))
        else:
            submit = md.submit_detect if case["kind"] == "detect" else md.submit_point
            handles.append(submit(img, case["object"], case["settings"]))
    results = [h.wait() for h in handles]
    assert len(results) == 60
    for res, case in zip(results, cases):
        assert_matches_golden(res, case)
    assert md.engine.stats.max_batch >= 50  # they really ran together


def test_preemption_recomputes_and_changes_nothing(fresh):
    # three 740-position prompts are admitted into 2239 pages, then outgrow them
    md = fresh(kv_pages=2240, prefix_cache=False, max_running=8)
    cases = [c for c in SKILL_CASES if c["kind"] == "query" and c["reasoning"] and c["image"] in ("wide", "tall")] * 2
    handles = [md.submit_query(golden_image(c["image"]), c["question"], True, None, c["settings"]) for c in cases]
    for h, c in zip(handles, cases):
        assert_matches_golden(h.wait(), c)
    assert md.engine.scheduler.num_preemptions > 0


def _add(md: Moondream, prepared) -> Request:
    """Queue a prepared request on the engine directly (the test drives the steps)."""
    skill, items, bidir = prepared
    req = Request(skill=skill, pending=items, bidir_len=bidir)
    md.engine.add_request(req)
    return req


def test_chunked_prefill_never_stalls_decodes(fresh):
    md = fresh(token_budget=64)
    engine = md.engine
    running = _add(md, md._prepare_caption(golden_image("wide"), "long", {"temperature": 0, "max_tokens": 60}))
    while not running.history or running.pending_len > 2:  # until it decodes
        engine.step()
    late = _add(md, md._prepare_query(None, "describe " * 300, False, None, {"temperature": 0, "max_tokens": 4}))
    prefill_steps = 0
    while not late.finished:
        engine.step()
        chunks = dict(engine.stats.last_chunks)
        assert sum(chunks.values()) <= 64
        if chunks.get(late, 0) > 1:
            prefill_steps += 1
            assert running.finished or chunks.get(running) == 1  # the decode ran in the same step
    assert prefill_steps >= 300 // 64
    while engine.has_work():
        engine.step()
    assert running.skill.finish_reason in ("stop", "length") and late.skill.finish_reason in ("stop", "length")


def test_cancel_frees_the_request(tiny_md):
    md = Moondream(tiny_md.model, tiny_md.tokenizer, EngineConfig())
    try:
        handle = md.submit_caption(golden_image("big"), "long", {"temperature": 0, "max_tokens": 3000})
        next(handle.events())  # generating
        handle.cancel()
        list(handle.events())
        assert handle.request.skill.finish_reason == "cancelled"
        assert handle.request.skill.completion_tokens < 300  # long before max_tokens
        assert_engine_idle(md.engine)
    finally:
        md.close()


def test_a_prompt_larger_than_the_cache_is_rejected(fresh):
    md = fresh(kv_pages=300, prefix_cache=False)
    with pytest.raises(PromptTooLongError, match="KV cache holds 299 pages"):
        md.query(golden_image("wide"), "what")
    text_only = golden_cases("query")[-1]
    assert md.query(None, text_only["question"], settings=text_only["settings"]) == text_only["result"]


def test_generation_that_outgrows_the_cache_stops_with_length(fresh):
    md = fresh(kv_pages=740, prefix_cache=False)  # 739 usable: exactly the prompt
    wide = next(c for c in golden_cases("query") if c["image"] == "wide" and not c["reasoning"] and not c.get("spatial_refs"))
    handle = md.submit_query(golden_image("wide"), wide["question"], settings=wide["settings"])
    assert handle.request.prompt_tokens == 739
    assert handle.wait() == {"answer": "w38499"}  # the first of the reference's two words
    assert handle.request.skill.finish_reason == "length"


def test_an_image_prefill_larger_than_the_budget_runs_beside_decodes(fresh):
    md = fresh(token_budget=256)  # smaller than an image prefix (730)
    engine = md.engine
    running = _add(md, md._prepare_caption(golden_image("wide"), "long", {"temperature": 0, "max_tokens": 40}))
    while not running.history or running.pending_len > 2:
        engine.step()
    late = _add(md, md._prepare_caption(golden_image("tall"), "short", {"temperature": 0, "max_tokens": 4}))
    engine.step()
    chunks = dict(engine.stats.last_chunks)
    if not running.finished:
        assert chunks.get(running) == 1
    assert chunks.get(late, 0) >= 730  # the whole image prefix, in the same step
    while engine.has_work():
        engine.step()


def test_clear_cache_runs_on_the_engine_thread_and_frees_unused_pages(fresh):
    md = fresh()
    md.caption(golden_image("tall"), "short", settings={"temperature": 0, "max_tokens": 2})
    cached = md.engine.kv_usage()["cached"]
    assert cached >= 730
    assert md.clear_cache() == cached
    assert md.engine.kv_usage()["free"] == md.engine.kv_usage()["capacity"]


def test_a_failing_skill_fails_only_its_request(fresh):
    md = fresh()
    good = next(c for c in golden_cases("caption") if c["image"] == "tall")
    prepared = md._prepare_caption(golden_image("tall"), "short", {"temperature": 0, "max_tokens": 4})

    def broken(out):
        raise RuntimeError("skill bug")

    prepared[0].on_output = broken
    handle = md._submit(*prepared)
    from tidal.engine.loop import RequestError

    with pytest.raises(RequestError, match="skill bug"):
        handle.wait()
    assert_matches_golden(run_case(md, good, golden_image("tall")), good)


def test_the_prefill_warm_up_leaves_no_trace(fresh):
    """The start-up ladder of prefill steps (run on CUDA to compile the kernels;
    called here directly) ends with no request, no cached prefix, no page
    held and fresh counters, and the engine's results are the golden ones."""
    from tidal.engine.engine import prefill_warm_sizes

    assert prefill_warm_sizes(300) == [127, 128, 255, 256, 299, 300]
    assert prefill_warm_sizes(2048)[-2:] == [2047, 2048] and all(n > 64 for n in prefill_warm_sizes(2048))
    md = fresh(token_budget=300)
    seen = []
    run = md.engine.runner.run
    md.engine.runner.run = lambda steps, **kw: seen.append(sum(item_len(i) for s in steps for i in s.items)) or run(steps, **kw)
    md.loop.call(lambda engine: engine._warm_prefill())
    assert seen == prefill_warm_sizes(300)  # one step each, nothing else
    assert md.engine.stats.steps == 0 and md.engine.kv_usage()["cached"] == 0
    assert_engine_idle(md.engine)
    case = SKILL_CASES[0]
    assert_matches_golden(run_case(md, case, golden_image(case["image"])), case)


def test_a_request_given_twice_is_refused_and_the_engine_stays_whole(fresh):
    """A Request object runs once: adding it again while it runs, or after it
    finished, raises and leaves no second entry (one used to hold a table row
    for good, halving a later batch of 128 to two waves of 64)."""
    from tidal.engine.generate import GenerateSkill
    from tidal.engine.sampling import SamplingParams

    md = fresh(max_running=4)
    rows = md.engine.req_to_token.available
    req = Request(skill=GenerateSkill(None, SamplingParams(temperature=0.0, max_tokens=3), 0, ()), pending=[0, 5, 6, 7], bidir_len=0)

    def run(engine):
        engine.add_request(req)
        with pytest.raises(ValueError, match="already submitted"):
            engine.add_request(req)  # waiting
        engine.step()
        with pytest.raises(ValueError, match="already submitted"):
            engine.add_request(req)  # running
        while not req.finished:
            engine.step()
        with pytest.raises(ValueError, match="already submitted"):
            engine.add_request(req)  # finished
        return len(engine.scheduler.running) + len(engine.scheduler.waiting), engine.req_to_token.available

    assert md.loop.call(run) == (0, rows)


def test_encoding_images_ahead_changes_no_result(fresh):
    """EngineConfig.encode_ahead: images of admitted requests that the token
    budget holds back are encoded during an earlier step (on CUDA beside it,
    on a stream of their own). Every image is still encoded once, the golden
    results hold, and every output logit equals the engine's without it."""
    cases = distinct_image_cases(SKILL_CASES)
    traces, encodes, ahead = {}, {}, {}
    for on in (False, True):
        md = fresh(token_budget=800, encode_ahead=on, trace_logits=True)
        count = Counter(md)
        reqs, ahead[on] = run_together_counting_encodes_ahead(md, cases)  # the budget holds all but one image prefix back each step
        for c, r in zip(cases, reqs):
            assert_matches_golden(r.skill.result(), c)
        traces[on], encodes[on] = [[t.logits for t in r.trace] for r in reqs], count.encodes
    assert len(cases) >= 3 and ahead[False] == 0 and ahead[True] > 0
    assert encodes[True] == encodes[False] == len(cases)
    for a, b in zip(traces[False], traces[True]):
        assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))
