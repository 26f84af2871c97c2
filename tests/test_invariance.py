"""A request's outputs do not depend on what else the engine is doing.

For every skill, the raw logits (text, coordinate and size) of every output of
a request run alone on a fresh engine equal, to 1e-6 relative, those of the
same request run after other requests filled the prefix cache, batched with
30 others, after preemption, with the cache off, with its prompt prefilled in
small chunks, and with the image prefix and the prompt in one step or in two.
Greedy text can agree by luck; logits cannot.
"""

from __future__ import annotations

import pytest
from conftest import assert_engine_idle, assert_same_traces, golden_cases, prepare_case

from tidal import EngineConfig, Moondream
from tidal.engine.request import Request


def _case(kind: str, image: str | None, **match) -> dict:
    return next(c for c in golden_cases(kind) if c["image"] == image and all(c.get(k) == v for k, v in match.items()))


# One request per skill and variant; sampled ones are seeded (batch-independent noise).
TARGETS = {
    "query": ("query", _case("query", "tall", reasoning=False, spatial_refs=None)),
    "query sampled": ("query", dict(_case("query", "tall", reasoning=False, spatial_refs=None), settings={"temperature": 0.8, "top_p": 0.9, "max_tokens": 12, "seed": 7})),
    "reasoning": ("query", _case("query", "wide", reasoning=True)),
    "spatial refs": ("query", next(c for c in golden_cases("query") if c["image"] == "square378" and c.get("spatial_refs"))),
    "text only": ("query", _case("query", None)),
    "caption": ("caption", _case("caption", "tall", length="long")),
    "detect": ("detect", _case("detect", "wide")),
    "point": ("point", _case("point", "tall")),
}


def _submit(md: Moondream, case: dict):
    return md._submit(*prepare_case(md, case))


def _engine(golden_md, **config) -> Moondream:
    return Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(trace_logits=True, **config))


@pytest.fixture(scope="module")
def alone(golden_md):
    """Each target run alone on a fresh engine: the reference trace."""
    out = {}
    for name, (_, case) in TARGETS.items():
        md = _engine(golden_md)
        try:
            handle = _submit(md, case)
            handle.wait()
            out[name] = handle.request
        finally:
            md.close()
    return out


@pytest.fixture
def engine(golden_md):
    made = []

    def make(**config) -> Moondream:
        md = _engine(golden_md, **config)
        made.append(md)
        return md

    yield make
    for md in made:
        assert_engine_idle(md.engine)
        md.close()


def _fillers() -> list[dict]:
    """Requests on other images and with other prompts (the same questions too)."""
    out = []
    for c in golden_cases():
        if c["kind"] in ("query", "caption", "detect", "point"):
            out.append(c)
    return out


@pytest.mark.parametrize("name", list(TARGETS))
def test_after_other_requests_filled_the_cache(alone, engine, name):
    md = engine()
    fillers = [c for c in _fillers() if c is not TARGETS[name][1]][::3]
    for c in fillers:
        _submit(md, c).wait()
    assert md.engine.prefix_cache.size > 3 * 730  # several images' prefixes are cached
    handle = _submit(md, TARGETS[name][1])
    handle.wait()
    assert_same_traces(handle.request, alone[name])


@pytest.mark.parametrize("name", list(TARGETS))
def test_twice_the_second_from_the_cache(alone, engine, name):
    md = engine()
    _submit(md, TARGETS[name][1]).wait()
    handle = _submit(md, TARGETS[name][1])
    handle.wait()
    if TARGETS[name][1]["image"] is not None:
        assert handle.request.cached_prompt_tokens >= 730
    assert_same_traces(handle.request, alone[name])


def test_batched_with_thirty_others(alone, engine):
    md = engine(max_running=64, token_budget=60_000)
    others = (_fillers() * 2)[:30]
    handles = [_submit(md, c) for c in others[:15]]
    targets = {name: _submit(md, case) for name, (_, case) in TARGETS.items()}
    handles += [_submit(md, c) for c in others[15:]]
    for h in handles + list(targets.values()):
        h.wait()
    assert md.engine.stats.max_batch >= 30
    for name, h in targets.items():
        assert_same_traces(h.request, alone[name])


@pytest.mark.parametrize("config", [{"prefix_cache": False}, {"token_budget": 3}, {"token_budget": 730}], ids=["cache off", "prompt in chunks of 3", "image then prompt"])
def test_engine_settings_change_nothing(alone, engine, config):
    md = engine(**config)
    for name, (_, case) in TARGETS.items():
        handle = _submit(md, case)
        handle.wait()
        if "token_budget" in config and case["image"] is not None:
            assert handle.request.prompt_tokens > config["token_budget"]  # it really was split
        assert_same_traces(handle.request, alone[name])


@pytest.mark.parametrize("name", list(TARGETS))
def test_after_preemption(alone, engine, name):
    """Preempted after its first output, the request recomputes what it had
    fed and goes on; every output, before and after, is unchanged."""
    md = engine(prefix_cache=False)
    skill, items, bidir = prepare_case(md, TARGETS[name][1])
    req = Request(skill=skill, pending=items, bidir_len=bidir)
    md.engine.add_request(req)
    while not req.trace:
        md.engine.step()
    assert not req.finished
    md.engine.scheduler.preempt(req)
    while md.engine.has_work():
        md.engine.step()
    assert req.preemptions == 1 and req.finished
    assert_same_traces(req, alone[name])


def test_preemption_under_memory_pressure(alone, engine):
    # Three ~740-position prompts fit in 2300 pages, then outgrow them: the
    # newest running requests are preempted and recomputed.
    md = engine(kv_pages=2300, prefix_cache=False, max_running=8)
    hogs = [dict(c, settings=dict(c["settings"], max_tokens=64)) for c in golden_cases("query") if c["reasoning"]]
    handles = [_submit(md, c) for c in hogs]
    targets = {name: _submit(md, case) for name, (_, case) in TARGETS.items()}
    for h in handles + list(targets.values()):
        h.wait()
    assert md.engine.scheduler.num_preemptions > 0
    for name, h in targets.items():
        assert_same_traces(h.request, alone[name])
