"""EngineConfig.overlap: a decode step queued before the running step's results
are read changes no output.

Each request's raw logits (text, coordinate, size) at every output equal, to
1e-6 relative, those of the same requests run with overlap off, for a batch
that mixes skills whose next input is the sampled token (steps launched
ahead), detect and point (their next input a coordinate or size read off the
output: ahead too), a reasoning query (its grounding coordinates fed ahead:
the model reads off the sampled token whether it feeds the token or its
coordinate), and a skill that sometimes feeds its token twice, proving the
guess of one wrong (dropped).
Aborting or preempting a request while a step holds it ahead leaks nothing.
"""

from __future__ import annotations

from conftest import (
    assert_engine_idle,
    assert_same_traces,
    golden_cases,
    golden_image,
    prepare_case,
)

from tidal import EngineConfig, Moondream
from tidal.core import CoordInput, InputItem, OutputSpec, SizeInput, StepResult
from tidal.engine.request import Request
from tidal.engine.skill import Skill


def _case(kind: str, image: str | None, **match) -> dict:
    return next(c for c in golden_cases(kind) if c["image"] == image and all(c.get(k) == v for k, v in match.items()))


MIX = [
    _case("query", "tall", reasoning=False, spatial_refs=None),
    dict(_case("query", "tall", reasoning=False, spatial_refs=None), settings={"temperature": 0.8, "top_p": 0.9, "max_tokens": 12, "seed": 7}),
    _case("query", "wide", reasoning=True),
    _case("query", None),
    _case("caption", "tall", length="long"),
    _case("detect", "wide"),
]


class Tokens(Skill):
    """Feeds back its sampled token until it has n: never stops early."""

    name = "tokens"

    def __init__(self, n: int, seed: int) -> None:
        super().__init__()
        self.n, self.seed, self.tokens = n, seed, []

    def next_output(self) -> OutputSpec:
        return OutputSpec(temperature=0.7, top_p=0.9, seed=self.seed, step=len(self.tokens))

    def last_output_next(self) -> bool:
        return len(self.tokens) + 1 >= self.n

    def spec_after_token(self) -> OutputSpec | None:
        return None if self.last_output_next() else OutputSpec(temperature=0.7, top_p=0.9, seed=self.seed, step=len(self.tokens) + 1)

    def on_output(self, out: StepResult) -> list[InputItem] | None:
        self.tokens.append(out.token)
        return None if len(self.tokens) >= self.n else [out.token]

    def result(self) -> dict:
        return {"tokens": list(self.tokens)}


class Doubles(Tokens):
    """Tokens, but feeds every third token twice: a step launched ahead,
    which guessed one input, is dropped there."""

    name = "doubles"

    def on_output(self, out: StepResult) -> list[InputItem] | None:
        fed = super().on_output(out)
        return fed * 2 if fed is not None and len(self.tokens) % 3 == 0 else fed


def _tokens(md: Moondream, n: int, seed: int) -> Request:
    """A Tokens request on a question about the golden 'tall' image."""
    _, items, bidir = md._prepare_query(golden_image("tall"), f"question {seed}", False, None, None)
    return Request(skill=Tokens(n, seed), pending=items, bidir_len=bidir)


def _tokens_without_overlap(golden_md, n: int, seeds: range) -> list[Request]:
    """Tokens requests of n tokens, one per seed, run to the end with overlap off."""
    off = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(trace_logits=True, overlap=False))
    want = [_tokens(off, n, seed) for seed in seeds]
    for r in want:
        off.engine.add_request(r)
    while off.engine.has_work():
        off.engine.step()
    off.close()
    return want


def _started_with_overlap(golden_md, n: int, seeds: range, outputs: int) -> tuple[Moondream, list[Request]]:
    """The same requests on an engine with overlap forced on, stepped until a
    step runs ahead and the first request has `outputs` outputs."""
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(trace_logits=True, overlap=True))
    reqs = [_tokens(md, n, seed) for seed in seeds]
    for r in reqs:
        md.engine.add_request(r)
    while md.engine._ahead is None or len(reqs[0].trace) < outputs:
        md.engine.step()
    return md, reqs


def _run(golden_md, overlap: bool, cases: list[dict], doubles: int = 0) -> tuple[Moondream, list[Request]]:
    """The golden cases (and `doubles` Doubles requests of 10 tokens), in one batch, run to the end."""
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(trace_logits=True, overlap=overlap))
    reqs = [Request(skill=skill, pending=items, bidir_len=bidir) for skill, items, bidir in (prepare_case(md, c) for c in cases)]
    for seed in range(doubles):
        req = _tokens(md, 10, seed)
        req.skill = Doubles(10, seed)
        reqs.append(req)
    for r in reqs:
        md.engine.add_request(r)
    while md.engine.has_work():
        md.engine.step()
    return md, reqs


def test_steps_launched_ahead_change_no_output(golden_md):
    on, got = _run(golden_md, True, MIX, doubles=1)
    off, want = _run(golden_md, False, MIX, doubles=1)
    try:
        stats = on.engine.stats
        assert stats.ahead_steps > 0  # steps were queued ahead of their predecessor's results
        assert stats.ahead_dropped > 0  # and the doubled tokens proved some guess wrong
        assert any(isinstance(i, CoordInput) for i in got[2].history)  # the reasoning query grounded (fed coordinates)
        assert off.engine.stats.ahead_steps == 0
        assert stats.steps < off.engine.stats.steps + stats.ahead_steps  # ahead steps are steps, not extra ones
        for g, w in zip(got, want):
            assert_same_traces(g, w)
        assert_engine_idle(on.engine)
    finally:
        on.close()
        off.close()


def test_reasoning_grounding_coordinates_run_ahead(golden_md):
    """The golden reasoning queries in one batch: a step is launched ahead
    even where the output will be a grounding coordinate (fed as a
    coordinate, the model tells off the sampled token), no guess is dropped,
    and every output's raw heads and every fed input equal overlap off's."""
    cases = [c for c in golden_cases("query") if c.get("reasoning")]
    on, got = _run(golden_md, True, cases)
    off, want = _run(golden_md, False, cases)
    try:
        stats = on.engine.stats
        coords = sum(isinstance(i, CoordInput) for r in got for i in r.history)
        assert coords >= 4  # the cases ground (coordinates fed back)
        assert stats.ahead_dropped == 0
        assert stats.ahead_steps >= stats.steps - 3  # all but the prefill and first decode steps (and one after a reasoning ends)
        for g, w in zip(got, want):
            assert _fed(g) == _fed(w)
            assert_same_traces(g, w)
        assert_engine_idle(on.engine)
    finally:
        on.close()
        off.close()


def test_fed_back_on_device_equals_what_the_skills_feed(golden_md):
    """The kinds and values a step queued ahead reads off packed outputs on
    the device (fed_back_on_device) equal the host's fed_back, and the
    skills' own coordinate and size arithmetic, for every bin; a
    FEED_SAMPLED row feeds the coordinate where the coordinate token was
    sampled, else the token."""
    import torch

    from tidal.core import FEED_COORD, FEED_SAMPLED, FEED_SIZE, FEED_TOKEN
    from tidal.models.moondream3.region import size_from_bins

    model = golden_md.model
    coord_id = model.config.tokenizer.coord_id
    bins = torch.arange(1024)
    tokens = torch.where(bins % 3 == 0, coord_id, bins)  # FEED_SAMPLED rows: the coordinate token on every third
    packed = torch.stack([tokens, bins, bins, bins.flip(0), bins % 2], dim=1)  # token, coord, width, height, over eos
    asked = torch.tensor([FEED_COORD, FEED_SIZE, FEED_SAMPLED, FEED_TOKEN]).repeat(256)
    kinds, values = model.fed_back_on_device(packed, asked)
    seen = set()
    for b, (a, kind, (v0, v1)) in enumerate(zip(asked.tolist(), kinds.tolist(), values.tolist())):
        token = int(tokens[b])
        result = StepResult(token, coord_bin=b, size_bins=(b, 1023 - b), coord_over_eos=bool(b % 2))
        fed = model.fed_back(a, result)
        if a == FEED_SAMPLED:
            assert kind == (FEED_COORD if token == coord_id else FEED_TOKEN)
            seen.add(kind)
        else:
            assert kind == a
        if kind == FEED_COORD:
            assert fed == CoordInput(v0) == CoordInput(b / 1024)
        elif kind == FEED_SIZE:
            w, h = size_from_bins(torch.tensor([b, 1023 - b])).tolist()  # as LocateSkill computes a size
            assert fed == SizeInput(v0, v1) == SizeInput(w, h)
        else:
            assert type(fed) is int and fed == token
    assert seen == {FEED_COORD, FEED_TOKEN}


def test_decode_graphs_feed_writes_tokens_coordinates_and_sizes_into_their_rows(golden_md):
    """DecodeGraphs._feed (what a step queued ahead is fed on the device), run
    on CPU tensors: each row gets the token, coordinate or size of the source
    output row it names, in the static inputs' fields, with the feedback kind
    fed_item says (a FEED_SAMPLED row: a coordinate for the coordinate token)."""
    from types import SimpleNamespace

    import torch

    from tidal.core import FEED_COORD, FEED_SAMPLED, FEED_SIZE, FEED_TOKEN, SeqStep
    from tidal.runner.graphs import _F, _FLOATS, _I, _INTS, DecodeGraphs

    model = golden_md.model
    coord_id = model.config.tokenizer.coord_id
    packed = torch.tensor([[11, 100, 5, 900, 1], [12, 300, 17, 40, 0], [13, 1023, 1023, 0, 1], [coord_id, 517, 3, 3, 1]])  # token, coord, width, height, over eos
    feeds = [FEED_TOKEN, FEED_COORD, FEED_SIZE, FEED_COORD, FEED_SAMPLED, FEED_SAMPLED]
    placeholders = [0, CoordInput(0.0), SizeInput(0.0, 0.0), CoordInput(0.0), 0, 0]
    rows = [2, 0, 1, 1, 3, 0]  # source output row of each step
    n = len(rows)
    fake = SimpleNamespace(ints=torch.zeros((len(_INTS), 8), dtype=torch.int64), floats=torch.zeros((len(_FLOATS), 8)), runner=SimpleNamespace(model=model))
    type_kind = {int: FEED_TOKEN, CoordInput: FEED_COORD, SizeInput: FEED_SIZE}
    fake.ints[_I["kinds"], :n] = torch.tensor([type_kind[type(p)] for p in placeholders])  # as _fill writes them from the placeholders
    steps = [SeqStep(i, 10, [p], 0, OutputSpec()) for i, p in enumerate(placeholders)]
    source = SimpleNamespace(out=packed)
    DecodeGraphs._feed(fake, steps, source, rows, feeds)  # type: ignore[arg-type]
    runner = golden_md.engine.runner
    got = []
    for i, (k, r) in enumerate(zip(feeds, rows)):
        result = runner.to_result(packed[r].tolist())
        want = runner.fed_item(k, result)
        got.append(type(want))
        assert int(fake.ints[_I["input_ids"], i]) == result.token
        assert int(fake.ints[_I["kinds"], i]) == type_kind[type(want)]
        v0, v1 = fake.floats[_F["value0"], i].item(), fake.floats[_F["value1"], i].item()
        if isinstance(want, CoordInput):
            assert want == CoordInput(v0)
        elif isinstance(want, SizeInput):
            assert want == SizeInput(v0, v1)
    assert got[4:] == [CoordInput, int]  # the sampled coordinate token fed its coordinate, the other token itself


def _fed(req: Request) -> list[InputItem]:
    """What a request fed but images (ImageInput compares by identity)."""
    return [item for item in req.history if isinstance(item, (int, CoordInput, SizeInput))]


def test_detect_and_point_run_ahead_feeding_coordinates_and_sizes(golden_md):
    """Every golden detect and point case in one batch: their steps are
    launched ahead (coordinates and sizes fed from the running step's output),
    the inputs fed are those of overlap off to the last bit, and so are every
    output's raw heads and the boxes and points found."""
    cases = golden_cases("detect") + golden_cases("point")
    on, got = _run(golden_md, True, cases)
    off, want = _run(golden_md, False, cases)
    try:
        stats = on.engine.stats
        assert stats.ahead_steps >= stats.steps // 2  # most steps ran ahead of their predecessor's results
        assert stats.ahead_dropped == 0  # and every guess was what the skill then fed (a stop ends a request, drops nothing)
        fed = {type(item) for r in got for item in r.history}
        assert CoordInput in fed and SizeInput in fed
        for g, w in zip(got, want):
            assert _fed(g) == _fed(w)  # the same items, coordinates and sizes equal as floats
            assert_same_traces(g, w)
        assert_engine_idle(on.engine)
    finally:
        on.close()
        off.close()


def test_a_request_aborted_or_preempted_while_ahead_leaks_nothing(golden_md):
    """One request aborted and one preempted while a step launched ahead holds
    them: the step's results for them are dropped, their slots come back, the
    preempted one recomputes, and the third request's outputs are unchanged."""
    want = _tokens_without_overlap(golden_md, 12, range(3))
    md, reqs = _started_with_overlap(golden_md, 12, range(3), outputs=3)
    try:
        assert all(r.ahead == 1 for r in reqs)  # each holds one slot of the step launched ahead
        md.engine.abort(reqs[0])
        md.engine.scheduler.preempt(reqs[1])
        assert reqs[1].ahead == 0 and not reqs[1].slots
        while md.engine.has_work():
            md.engine.step()
        assert reqs[0].cancelled and not reqs[1].cancelled and reqs[1].preemptions == 1
        assert_same_traces(reqs[1], want[1])
        assert_same_traces(reqs[2], want[2])
        assert_engine_idle(md.engine)
    finally:
        md.close()


def test_a_request_arriving_waits_at_most_the_step_already_launched(golden_md):
    """No step is launched ahead while a request waits: it is admitted by the
    step after the one already running."""
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(overlap=True))
    try:
        md.engine.add_request(_tokens(md, 30, 0))
        while md.engine._ahead is None:
            md.engine.step()
        late = Request(**dict(zip(("skill", "pending", "bidir_len"), prepare_case(md, _case("query", None)))))
        md.engine.add_request(late)
        md.engine.step()  # reads the step launched ahead; launches none past it
        assert md.engine._ahead is None and not late.history
        md.engine.step()
        assert late.history  # admitted and fed
        while md.engine.has_work():
            md.engine.step()
        assert_engine_idle(md.engine)
    finally:
        md.close()


def test_a_failed_read_of_results_reruns_the_step_and_changes_no_output(golden_md, caplog):
    """Reading a step's results fails once (while a step launched ahead is fed
    from them): that step is dropped, the sequences run again one by one, and
    every output is what an undisturbed run gives."""
    want = _tokens_without_overlap(golden_md, 10, range(2))
    md, reqs = _started_with_overlap(golden_md, 10, range(2), outputs=4)
    try:
        collect, calls = md.engine.runner.collect, []

        def fails_once(launched):
            calls.append(launched)
            if len(calls) == 1:
                raise RuntimeError("injected")
            return collect(launched)

        md.engine.runner.collect = fails_once
        md.engine.step()
        assert "injected" in caplog.text and md.engine._ahead is None  # the step fed from the failed read was dropped
        assert len(calls) == 3  # the failed read, then one per sequence
        while md.engine.has_work():
            md.engine.step()
        for g, w in zip(reqs, want):
            assert_same_traces(g, w)
        assert_engine_idle(md.engine)
    finally:
        md.close()


def test_a_request_at_its_last_output_leaves_the_step_ahead_to_the_others(golden_md):
    """Requests of different lengths: once all decode, every step is queued
    ahead of its predecessor's results, those where a request reads its last
    output too (the step ahead leaves it out); outputs as with overlap off."""
    lengths = (4, 7, 11)
    off = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(trace_logits=True, overlap=False))
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(trace_logits=True, overlap=True))
    try:
        want = [_tokens(off, n, seed) for seed, n in enumerate(lengths)]
        got = [_tokens(md, n, seed) for seed, n in enumerate(lengths)]
        for w, g in zip(want, got):
            off.engine.add_request(w)
            md.engine.add_request(g)
        while off.engine.has_work():
            off.engine.step()
        not_ahead = 0  # steps read while all requests run and decode, not launched ahead
        while md.engine.has_work():
            sched = md.engine.scheduler
            decoding = bool(sched.running) and not sched.waiting and all(r.history for r in sched.running)
            not_ahead += decoding and md.engine._ahead is None
            md.engine.step()
        assert not_ahead == 0
        assert md.engine.stats.ahead_dropped == 0
        for g, w in zip(got, want):
            assert_same_traces(g, w)
            assert len(g.trace) == g.skill.n
        assert_engine_idle(md.engine)
    finally:
        md.close()
        off.close()


def test_a_request_at_the_context_limit_leaves_the_step_ahead_to_the_others(golden_md):
    """max_context cut to 6 positions past the longest prompt: the request
    that reaches it stops ("length") and the step queued ahead carries the
    other (none read without one once all decode); outputs as with overlap off."""
    from tidal.core import items_len

    traces = {}
    for overlap in (False, True):
        md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(trace_logits=True, overlap=overlap))
        try:
            reqs = [_tokens(md, 30, 0), _tokens(md, 30, 1)]
            reqs[1].pending = reqs[1].pending[:-3]  # a shorter prompt: it reaches the limit 3 steps later
            md.engine.max_context = max(items_len(r.pending) for r in reqs) + 6
            for r in reqs:
                md.engine.add_request(r)
            not_ahead = 0
            while md.engine.has_work():
                sched = md.engine.scheduler
                not_ahead += bool(sched.running) and not sched.waiting and all(r.history for r in sched.running) and md.engine._ahead is None
                md.engine.step()
            assert [r.skill.finish_reason for r in reqs] == ["length", "length"]
            assert len(reqs[1].trace) == len(reqs[0].trace) + 3
            assert not overlap or not_ahead == 0
            traces[overlap] = reqs
            assert_engine_idle(md.engine)
        finally:
            md.close()
    for g, w in zip(traces[True], traces[False]):
        assert_same_traces(g, w)


def test_a_row_freed_by_a_request_at_its_last_output_admits_a_waiting_one_at_once(golden_md):
    """Every table row taken (max_running=2), one request at its last output:
    no step is queued ahead without the waiting request, which gets its first
    output at the same step() call as with overlap off."""
    first_output_at = {}
    for overlap in (False, True):
        md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(max_running=2, overlap=overlap, prefix_cache=False))
        try:
            reqs = [_tokens(md, n, seed) for seed, n in enumerate((3, 12, 4))]
            for r in reqs:
                md.engine.add_request(r)
            calls = 0
            while reqs[2].first_output_at is None:
                md.engine.step()
                calls += 1
            first_output_at[overlap] = calls
            while md.engine.has_work():
                md.engine.step()
            assert_engine_idle(md.engine)
        finally:
            md.close()
    assert first_output_at[True] == first_output_at[False]


def test_a_request_waiting_for_a_table_row_does_not_stop_steps_ahead(golden_md):
    """With every table row taken (max_running=1) a waiting request cannot be
    admitted anyway: steps go on being launched ahead, and it runs once the
    first finishes."""
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(overlap=True, max_running=1))
    try:
        first, second = _tokens(md, 8, 0), _tokens(md, 4, 1)
        md.engine.add_request(first)
        md.engine.add_request(second)
        while not first.finished:
            md.engine.step()
        assert not second.history and md.engine.stats.ahead_steps >= 5  # first's decode steps after its prefill ran ahead
        while md.engine.has_work():
            md.engine.step()
        assert len(second.skill.tokens) == 4
        assert_engine_idle(md.engine)
    finally:
        md.close()


class Faulty(Tokens):
    """Tokens whose next_output raises from its `at`-th call on."""

    def __init__(self, n: int, seed: int, at: int) -> None:
        super().__init__(n, seed)
        self.calls, self.at = 0, at

    def next_output(self) -> OutputSpec:
        self.calls += 1
        if self.calls >= self.at:
            raise ValueError("skill bug")
        return super().next_output()


def test_a_skill_failing_while_a_step_runs_ahead_fails_only_its_request(golden_md):
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig(overlap=True))
    try:
        good, bad = _tokens(md, 8, 0), _tokens(md, 8, 1)
        bad.skill = Faulty(8, 1, at=4)
        for r in (good, bad):
            md.engine.add_request(r)
        while md.engine.has_work():
            md.engine.step()
        assert isinstance(bad.error, ValueError) and good.error is None and len(good.skill.tokens) == 8
        assert md.engine.stats.ahead_steps > 0
        assert_engine_idle(md.engine)
    finally:
        md.close()
