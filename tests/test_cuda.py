"""The same reference checks on a CUDA device (skipped where there is none)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    GOLDEN,
    assert_matches_golden,
    case_id,
    finished_request,
    golden_cases,
    golden_image,
    run_case,
)

from tidal.core import OutputSpec
from tidal.engine.skill import Skill

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SKILL_CASES = [c for c in golden_cases() if c["kind"] in ("query", "caption", "detect", "point")]


@pytest.fixture(scope="module")
def cuda_md():
    from tidal import Moondream

    md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32")
    yield md
    md.close()


@pytest.fixture(scope="module")
def cuda_encoded(cuda_md):
    return {n: cuda_md.encode_image(golden_image(n)) for n in ("square378", "wide", "tall", "big", "tiny")}


@pytest.mark.parametrize("case", golden_cases("image"), ids=case_id)
def test_image_embeddings_on_cuda(cuda_encoded, golden_md, case):
    """CUDA float32 equals the CPU path on the same crops. (The CPU path is held to
    the reference in test_golden; crops depend on Pillow's resampling, and other
    Pillow versions than the one the reference used move embeddings by ~1e-3.)"""
    want = golden_md.encode_image(golden_image(case["image"])).embeds
    got = cuda_encoded[case["image"]].embeds.cpu()
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= 1e-5, err


@pytest.mark.parametrize("case", SKILL_CASES, ids=case_id)
def test_skill_on_cuda(cuda_md, cuda_encoded, case):
    image = None if case["image"] is None else cuda_encoded[case["image"]]
    assert_matches_golden(run_case(cuda_md, case, image), case)


# The outputs each skill acts on: text skills the token, detect the coordinate
# and size bins, point the coordinate bins; both decide whether to go on by
# logit(coord id 5) >= logit(eos id 0).
USED = {"query": ("token",), "caption": ("token",), "detect": ("coord", "width", "height", "go on"), "point": ("coord", "go on")}


def _choice(trace, name: str) -> int:
    if name == "go on":
        return int(trace.logits[5] >= trace.logits[0])
    return int({"token": trace.logits, "coord": trace.coord, "width": trace.size[0], "height": trace.size[1]}[name].argmax())


def _margin(trace, name: str) -> float:
    """The float32 gap between the two choices, relative to the largest |logit|."""
    if name == "go on":
        return float((trace.logits[5] - trace.logits[0]).abs() / trace.logits.abs().max())
    x = {"token": trace.logits, "coord": trace.coord, "width": trace.size[0], "height": trace.size[1]}[name].double()
    top = x.topk(2).values
    return float((top[0] - top[1]) / x.abs().max())


def test_bf16_fast_path_follows_the_float32_torch_path():
    """bf16 (fast path) gives the float32 torch path's results on the golden
    cases, except where the float32 margin between the top two choices is
    within bf16's reach at the first step that differs; those are listed with
    their margins. (On the random fixture many margins are tiny, and a MoE
    router's near-tie can flip an expert: see tests/test_bf16.py.)"""
    from tidal import EngineConfig, Moondream

    f32 = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32", engine_config=EngineConfig(kernels=False, trace_logits=True))
    b16 = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="bfloat16", engine_config=EngineConfig(kernels=True, trace_logits=True))
    divergences, agree = [], 0
    try:
        for case in SKILL_CASES:
            want, got = finished_request(f32, case), finished_request(b16, case)
            if want.skill.result() == got.skill.result():
                agree += 1
                continue
            for step, (w, g) in enumerate(zip(want.trace, got.trace)):
                differ = [n for n in USED[case["kind"]] if _choice(w, n) != _choice(g, n)]
                if differ:
                    divergences += [(case_id(case), step, n, round(_margin(w, n), 5)) for n in differ]
                    break
            else:
                divergences.append((case_id(case), len(want.trace), "length", 0.0))
    finally:
        f32.close()
        b16.close()
    print(f"\nbf16 fast path vs float32 torch path: {agree} of {len(SKILL_CASES)} results equal; first divergence of the others (case, step, output, float32 relative margin):")
    for d in divergences:
        print("  ", d)
    assert agree >= 0.6 * len(SKILL_CASES), f"{agree} of {len(SKILL_CASES)} results agree"
    assert all(m <= 0.05 for *_, m in divergences), divergences


class Endless(Skill):
    """Samples (temperature 0.7) and never stops: a decode batch that stays whole."""

    def __init__(self, seed: int, temperature: float = 0.7, banned: tuple[int, ...] = (3,)) -> None:
        super().__init__()
        self.seed, self.steps, self.temperature, self.banned = seed, 0, temperature, banned

    def next_output(self) -> OutputSpec:
        return OutputSpec(temperature=self.temperature, top_p=0.9, seed=self.seed, step=self.steps, banned=self.banned)

    def on_output(self, out) -> list:
        self.steps += 1
        return [out.token]

    def result(self) -> dict:
        return {}


class Ahead(Endless):
    """Endless that names its next OutputSpec: the engine may queue its next
    step before reading its output (EngineConfig.overlap)."""

    def spec_after_token(self) -> OutputSpec:
        return OutputSpec(temperature=self.temperature, top_p=0.9, seed=self.seed, step=self.steps + 1, banned=self.banned)


def test_steps_queued_ahead_feed_on_the_device_and_change_nothing():
    """EngineConfig.overlap: a decode replay queued behind the running one,
    its tokens copied on the device from the running one's outputs, gives the
    same tokens and the same K/V, bit for bit (float32), as the engine that
    reads every step's results before launching the next."""
    from tidal import EngineConfig, Moondream
    from tidal.engine.request import Request

    runs = {}
    for overlap in (False, True):
        md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32", engine_config=EngineConfig(max_running=8, overlap=overlap, prefix_cache=False))
        try:
            engine, reqs = md.engine, []
            for i, name in enumerate(("wide", "tall", None)):
                _, items, bidir = md._prepare_query(golden_image(name) if name else None, f"question {i}", False, None, None)
                reqs.append(Request(skill=Ahead(seed=i), pending=items, bidir_len=bidir))
                engine.add_request(reqs[-1])
            for _ in range(20):
                engine.step()
            torch.cuda.synchronize()
            pool = engine.kv_pool
            kv = [torch.stack([torch.stack((pool.k[layer][r.slots[: len(r.history)]], pool.v[layer][r.slots[: len(r.history)]])) for layer in range(len(pool.k))]) for r in reqs]
            runs[overlap] = ([list(r.history[-19:]) for r in reqs], kv, engine.stats.ahead_steps, engine.runner.graph_replays)
            for r in reqs:
                engine.abort(r)
        finally:
            md.close()
    (want_tokens, want_kv, _, _), (got_tokens, got_kv, ahead, replays) = runs[False], runs[True]
    assert ahead >= 18 and replays >= 18  # every decode step after the first was queued ahead, and replayed
    assert got_tokens == want_tokens
    for g, w in zip(got_kv, want_kv):
        assert torch.equal(g, w)


def test_detect_and_point_queued_ahead_feed_coordinates_and_sizes_on_the_device():
    """Detect, point and reasoning queries with overlap: each step queued
    behind the running one feeds the coordinate, size or token read on the
    device off the running step's outputs (Model.fed_back_on_device; for
    reasoning, a coordinate where the coordinate token was sampled), equal to
    the last bit to what the skills feed with overlap off; so are the boxes,
    points and answers."""
    from conftest import prepare_case

    from tidal import EngineConfig, Moondream
    from tidal.core import (
        FEED_COORD,
        FEED_SIZE,
        FEED_TOKEN,
        CoordInput,
        SizeInput,
        item_len,
    )
    from tidal.engine.request import Request
    from tidal.runner.graphs import _F, _I

    def item_at(req, pos):
        """The item req fed at position pos (None past its history)."""
        at = 0
        for item in req.history:
            if pos < at + item_len(item):
                return item
            at += item_len(item)
        return None

    cases = [c for c in golden_cases() if c["kind"] in ("detect", "point") and c["settings"].get("max_objects") == 8 or c.get("reasoning")]
    runs = {}
    for overlap in (False, True):
        md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32", engine_config=EngineConfig(max_running=16, overlap=overlap, prefix_cache=False))
        try:
            engine = md.engine
            graphs, on_device = engine.runner.graphs, []
            feed = graphs._feed

            def recording(steps, source, rows, kinds, feed=feed, graphs=graphs, engine=engine, on_device=on_device):
                """What each guessed row is fed on the device (read back: a sync, for the test only)."""
                feed(steps, source, rows, kinds)
                n = len(steps)
                values = graphs.floats[_F["value0"] : _F["value1"] + 1, :n].T.cpu().tolist()
                fed_kinds = graphs.ints[_I["kinds"], :n].cpu().tolist()
                tokens = graphs.ints[_I["input_ids"], :n].cpu().tolist()
                by_row = {r.row: r for r in engine.scheduler.running}
                on_device.extend((by_row[s.row], s.start_pos, k, t, v) for s, k, t, v in zip(steps, fed_kinds, tokens, values))

            graphs._feed = recording
            reqs = [Request(skill=skill, pending=items, bidir_len=bidir) for skill, items, bidir in (prepare_case(md, c) for c in cases)]
            for r in reqs:
                engine.add_request(r)
            while engine.has_work():
                engine.step()
            torch.cuda.synchronize()
            fed = [[i for i in r.history if isinstance(i, (int, CoordInput, SizeInput))] for r in reqs]
            runs[overlap] = (fed, [r.skill.result() for r in reqs], engine.stats.ahead_steps, engine.stats.ahead_dropped, engine.runner.graph_replays)
            checked = {FEED_TOKEN: 0, FEED_COORD: 0, FEED_SIZE: 0}
            for req, pos, kind, token, (v0, v1) in on_device:  # each input fed on the device is the item the skill then fed, bit for bit
                item = item_at(req, pos)
                if item is None or req.skill.name == "query" and token == req.skill.ids.answer_id:
                    continue  # the request stopped there; or its reasoning ended there (the suffix fed instead: the guess dropped)
                want = {FEED_TOKEN: token, FEED_COORD: CoordInput(v0), FEED_SIZE: SizeInput(v0, v1)}[kind]
                assert type(item) is type(want) and item == want, (req.skill.name, pos, item, kind, token, v0, v1)
                checked[kind] += 1
            reasoning_coords = sum(isinstance(i, CoordInput) for r in reqs if r.skill.name == "query" for i in r.history)
            assert overlap is False or checked[FEED_COORD] >= 10 and checked[FEED_SIZE] >= 1 and checked[FEED_TOKEN] >= 1 and reasoning_coords >= 4
        finally:
            md.close()
    (want_fed, want_results, *_), (got_fed, got_results, ahead, dropped, replays) = runs[False], runs[True]
    assert any(isinstance(i, SizeInput) for f in got_fed for i in f) and any(isinstance(i, CoordInput) for f in got_fed for i in f)
    assert ahead >= 10 and replays >= ahead and dropped == 0  # steps ran ahead as graph replays, every guess right
    assert got_fed == want_fed
    assert got_results == want_results


def test_decode_graph_replays_are_bit_identical_to_eager_runs():
    """The same batch-32 decode step, replayed ten times from its CUDA graph and
    run eagerly through the same function: the same logits, bit for bit."""
    from tidal import EngineConfig, Moondream
    from tidal.engine.request import Request

    md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="bfloat16", engine_config=EngineConfig(max_running=32))
    try:
        graphs = md.engine.runner.graphs
        assert graphs is not None and (32, True) in graphs.graphs
        images = [md.encode_image(golden_image(n)) for n in ("wide", "tall", "square378", "big")]
        reqs = []
        for i in range(32):
            _, items, bidir = md._prepare_query(images[i % 4], f"question {i}", False, None, None)
            reqs.append(Request(skill=Endless(seed=i), pending=items, bidir_len=bidir))
            md.engine.add_request(reqs[-1])
        while any(not r.history or r.pending_len > 1 for r in reqs):
            md.engine.step()
        steps = [md.engine._seq_step(c) for c in md.engine.scheduler.schedule()]
        assert len(steps) == 32 and graphs.can_run(steps)
        runs = []
        for _ in range(10):
            tokens = [r.token for r in graphs.run(steps)]
            runs.append((tokens, graphs.last_logits[:32].clone()))
        eager = [r.token for r in graphs.run(steps, replay=False)], graphs.last_logits[:32].clone()
        for tokens, logits in runs[1:] + [eager]:
            assert tokens == runs[0][0]
            assert torch.equal(logits, runs[0][1])
        for r in reqs:
            md.engine.abort(r)
    finally:
        md.close()


def test_fused_moe_is_deterministic():
    from tidal.kernels.fused_moe import fused_experts

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 2048, generator=gen).to("cuda", torch.bfloat16)
    fc1 = (torch.randn(64, 2048, 2048, generator=gen) / 45).to("cuda", torch.bfloat16)
    fc2 = (torch.randn(64, 2048, 1024, generator=gen) / 32).to("cuda", torch.bfloat16)
    top, ids = torch.randn(64, 64, generator=gen).topk(8, dim=-1)
    weights = top.softmax(-1).to("cuda", torch.bfloat16)
    first = fused_experts(x, weights, ids.cuda(), fc1, fc2)
    for _ in range(9):
        assert torch.equal(fused_experts(x, weights, ids.cuda(), fc1, fc2), first)


def test_one_device_sync_per_decode_step():
    """A batched decode step reads its outputs back once and waits on nothing else."""
    import traceback
    import warnings

    from tidal import Moondream
    from tidal.engine.request import Request

    md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="bfloat16")
    try:
        reqs = []
        for q in ("what color is the car", "how many people are there", "describe this image"):
            skill, items, bidir = md._prepare_query(md.encode_image(golden_image("wide")), q, False, None, {"temperature": 0.7, "max_tokens": 50, "seed": 1})
            reqs.append(Request(skill=skill, pending=items, bidir_len=bidir))
            md.engine.add_request(reqs[-1])
        while any(not r.history or r.pending_len > 1 for r in reqs):
            md.engine.step()
        torch.cuda.synchronize()
        syncs: list[str] = []

        def record(message, *args, **kwargs):  # runs where the sync happened: keep the stack
            if "called a synchronizing" in str(message):
                syncs.append("".join(traceback.format_stack(limit=6)[:-1]))

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                md.engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert len(md.engine.stats.last_chunks) == 3  # the step decoded all three
        assert len(syncs) <= 1, "\n---\n".join(syncs)
        for r in reqs:
            md.engine.abort(r)
    finally:
        md.close()


def test_short_extends_replay_graphs_and_match_the_extend_kernel():
    """A question about a cached image (and a text-only prompt) feeds several
    causal positions: the step replays a decode graph, one row per position,
    and its outputs equal the extend kernel's (float32, eager) to 1e-5."""
    from tidal import EngineConfig, Moondream
    from tidal.engine.request import Request

    md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32", engine_config=EngineConfig(max_running=64))
    try:
        graphs, runner = md.engine.runner.graphs, md.engine.runner
        image = golden_image("wide")
        _, items, bidir = md._prepare_query(image, "what is this", False, None, None)
        first = Request(skill=Endless(seed=0), pending=items, bidir_len=bidir)
        md.engine.add_request(first)
        md.engine.step()  # the image and its question: eager; the image prefix is cached now
        md.engine.abort(first)
        reqs = []
        for i, (img, q) in enumerate([(image, "how many cars are there"), (image, "what color is the sky"), (None, "write a poem about the sea")]):
            _, items, bidir = md._prepare_query(img, q, False, None, None)
            reqs.append(Request(skill=Endless(seed=i, temperature=0.0, banned=()), pending=items, bidir_len=bidir))
            md.engine.add_request(reqs[-1])
        steps = [md.engine._seq_step(c) for c in md.engine.scheduler.schedule()]
        assert len(steps) == 3 and graphs.can_run(steps)
        assert all(len(s.items) > 1 for s in steps) and steps[0].start_pos >= 730  # the image served from the cache
        want_logits, _, _ = md.model.heads(runner.forward(steps))  # the extend kernel, eagerly
        replays = graphs.replays
        got = graphs.run(steps)
        assert graphs.replays == replays + 1
        rows = [sum(len(s.items) for s in steps[: i + 1]) - 1 for i in range(3)]
        got_logits = graphs.last_logits[rows]
        err = float((got_logits - want_logits).abs().max() / want_logits.abs().max())
        assert err <= 1e-5, err
        assert [r.token for r in got] == want_logits.argmax(-1).tolist()
        for r in reqs:
            md.engine.abort(r)
    finally:
        md.close()


def test_vision_encoder_graphs_replay_the_eager_encoder(cuda_md):
    """The engine captured the encoder per crop count: a replay gives the eager
    encoder's features bit for bit, for one crop and for the most crops."""
    model = cuda_md.engine.model
    graphs = model.encoder_graphs
    assert graphs is not None and len(graphs.graphs) == model.config.vision.max_crops + 1
    v = model.config.vision
    for n in (1, v.max_crops + 1):
        crops = torch.rand(n, v.in_channels, v.crop_size, v.crop_size, device="cuda", generator=torch.Generator("cuda").manual_seed(n)) * 2 - 1
        want = model.vision.encode_crops(crops)
        before = graphs.replays
        got = graphs(crops).clone()
        assert graphs.replays == before + 1 and torch.equal(got, want)


def test_prefill_graphs_replay_and_give_the_reference_results():
    """EngineConfig(prefill_graphs=True): image prefills and mixed steps replay
    extend graphs, and every golden skill case still matches the reference."""
    from tidal import EngineConfig, Moondream

    md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32", engine_config=EngineConfig(prefill_graphs=True, max_running=8))
    try:
        graphs = md.engine.runner.extend_graphs
        assert graphs is not None and graphs.graphs
        for case in SKILL_CASES[:6]:
            assert_matches_golden(finished_request(md, case).skill.result(), case)
        assert graphs.replays > 0
    finally:
        md.close()


def test_skinny_projections_give_the_reference_results():
    """EngineConfig(skinny_gemm="all"): every decode-sized projection runs the
    Triton skinny product inside the graphs, and every golden skill case still
    matches the reference; an engine with it off turns it off again."""
    from tidal import EngineConfig, Moondream
    from tidal.layers.linear import skinny_mode

    md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32", engine_config=EngineConfig(skinny_gemm="all", max_running=8))
    try:
        assert skinny_mode() == "all"
        for case in SKILL_CASES[:6]:
            assert_matches_golden(finished_request(md, case).skill.result(), case)
        assert md.engine.runner.graphs.replays > 0
    finally:
        md.close()
    off = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32", engine_config=EngineConfig(skinny_gemm="off", max_running=2))
    try:
        assert skinny_mode() == "off"
    finally:
        off.close()


def test_the_prefill_warm_up_changes_nothing_but_compile_time():
    """With kernels on CUDA the engine prefills a ladder of prompts at start-up
    (EngineConfig.warm_prefill): afterwards it is idle, its counters and prefix
    cache empty, and a golden case's every output logit equals, bit for bit,
    an engine made without the warm-up."""
    from conftest import assert_engine_idle

    from tidal import EngineConfig, Moondream

    traces = {}
    for warm in (True, False):
        md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32", engine_config=EngineConfig(warm_prefill=warm, trace_logits=True, max_running=4))
        try:
            if warm:
                assert md.engine.stats.steps == 0 and md.engine.kv_usage()["cached"] == 0
                assert_engine_idle(md.engine)
            req = finished_request(md, SKILL_CASES[0])
            assert_matches_golden(req.skill.result(), SKILL_CASES[0])
            traces[warm] = [t.logits for t in req.trace]
        finally:
            md.close()
    assert len(traces[True]) == len(traces[False]) > 0
    assert all(torch.equal(a, b) for a, b in zip(traces[True], traces[False]))


def test_the_gelu_epilogue_is_the_tanh_gelu_of_the_product():
    """linear_gelu_tanh(epilogue=True) on CUDA (cuBLASLt's GELU epilogue, the
    vision MLPs' fast path) against the tanh GELU of the product, float32 and
    bf16, 2-D and 3-D inputs of Moondream's encoder shapes; and far from the
    erf GELU in float32, so the form is checked too."""
    import torch.nn.functional as F

    from tidal.layers.linear import linear_gelu_tanh

    gen = torch.Generator(device="cuda").manual_seed(4)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.randn(2, 729, 1152, device="cuda", generator=gen).to(dtype)
        w = (torch.randn(4304, 1152, device="cuda", generator=gen) / 34).to(dtype)
        b = torch.randn(4304, device="cuda", generator=gen).to(dtype)
        want = F.gelu(F.linear(x.double(), w.double(), b.double()), approximate="tanh")
        for inp in (x, x[0]):
            got = linear_gelu_tanh(inp, w, b, epilogue=True)
            ref = want if inp.dim() == 3 else want[0]
            assert got.shape == ref.shape and got.dtype == dtype
            assert float((got.double() - ref).norm() / ref.norm()) <= tol
        if dtype == torch.float32:
            erf = F.gelu(F.linear(x.double(), w.double(), b.double()))
            assert float((erf - want).norm() / want.norm()) > 5 * tol  # (1.8e-4 at these shapes)


def test_parallel_branches_on_two_streams_give_the_same_bits(monkeypatch):
    """text.PARALLEL_BRANCHES: each block's MLP branch on a side stream beside
    its attention branch, inside the decode and extend graphs too. Golden
    skill cases (one at a time, then all at once: batched steps) match the
    reference, and every output logit of the one-at-a-time runs equals, bit
    for bit, the one-stream engine's (the same kernels on the same inputs);
    so does the side stream at a higher priority (text.BRANCH_PRIORITY)."""
    from conftest import prepare_case

    from tidal import EngineConfig, Moondream
    from tidal.models.moondream3 import text

    cases = SKILL_CASES[:6]
    traces = {}
    for parallel, priority in ((False, 0), (True, 0), (True, -1)):
        monkeypatch.setattr(text, "PARALLEL_BRANCHES", parallel)
        monkeypatch.setattr(text, "BRANCH_PRIORITY", priority)
        md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32", engine_config=EngineConfig(trace_logits=True, max_running=8))
        try:
            side = md.model.text.side_stream
            assert side is not None and side.priority == torch.cuda.Stream(priority=priority).priority  # (clamped to the device's range)
            alone = [finished_request(md, c) for c in cases]
            for c, req in zip(cases, alone):
                assert_matches_golden(req.skill.result(), c)
            traces[parallel, priority] = [[t.logits for t in r.trace] for r in alone]
            handles = [md._submit(*prepare_case(md, c)) for c in cases]  # at once: batched steps (their make-up varies run to run)
            for c, h in zip(cases, handles):
                assert_matches_golden(h.wait(), c)
            assert md.engine.stats.max_batch > 1 and md.engine.runner.graph_replays > 0
        finally:
            md.close()
    for other in ((True, 0), (True, -1)):
        for a, b in zip(traces[False, 0], traces[other]):
            assert len(a) == len(b) > 0
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_programmatic_dependent_launch_gives_the_same_bits(monkeypatch):
    """tidal.kernels.pdl on: Moondream's decode-chain kernels launch with PDL
    (in the captured graphs too) with a block's branches on one stream, and
    on two streams where text.PDL_BRANCHES says ("both" here; by default
    neither stream's). Each way golden skill cases match the reference and
    every output logit equals, bit for bit, the engine's with PDL off on one
    stream."""
    from tidal import EngineConfig, Moondream
    from tidal.kernels import pdl
    from tidal.models.moondream3 import text

    if not pdl.available(torch.device("cuda")):
        pytest.skip("needs sm_90 and Triton's grid-dependency ops")
    cases = SKILL_CASES[:6]
    traces = {}
    monkeypatch.setattr(text, "PDL_BRANCHES", "both")
    for on, two_streams in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(pdl, "ENABLED", on)
        monkeypatch.setattr(text, "PARALLEL_BRANCHES", two_streams)
        md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32", engine_config=EngineConfig(trace_logits=True, max_running=8))
        try:
            assert pdl.pdl_on(md.engine.runner.device) == on
            alone = [finished_request(md, c) for c in cases]
            for c, req in zip(cases, alone):
                assert_matches_golden(req.skill.result(), c)
            traces[on, two_streams] = [[t.logits for t in r.trace] for r in alone]
            assert md.engine.runner.graph_replays > 0
        finally:
            md.close()
    for form in ((True, False), (True, True)):
        for a, b in zip(traces[False, False], traces[form]):
            assert len(a) == len(b) > 0
            assert all(torch.equal(x, y) for x, y in zip(a, b)), form


def test_pdl_branches_choose_which_streams_kernels_launch_with_pdl(monkeypatch):
    """text.PDL_BRANCHES on two streams: every decode-chain kernel launched
    on the MoE branch's side stream takes PDL only under "side" and "both",
    every one on the main stream (attention, the residual norms) only under
    "main" and "both"; with one stream all of them take it. Read from the
    kernels' own pdl_on calls while the engine starts (graph capture) and
    runs a golden case."""
    from tidal import EngineConfig, Moondream
    from tidal.kernels import (
        fused_moe,
        moe_route,
        paged_attention,
        pdl,
        residual_norm,
        tau_rope,
    )
    from tidal.models.moondream3 import text

    if not pdl.available(torch.device("cuda")):
        pytest.skip("needs sm_90 and Triton's grid-dependency ops")
    monkeypatch.setattr(pdl, "ENABLED", True)
    calls: list[tuple[int, bool]] = []  # (the launching stream, PDL or not)

    def spy(device):
        on = pdl.pdl_on(device)
        calls.append((torch.cuda.current_stream().stream_id, on))
        return on

    for module in (fused_moe, moe_route, paged_attention, residual_norm, tau_rope):
        monkeypatch.setattr(module, "pdl_on", spy)
    expected = {"none": (False, False), "main": (True, False), "side": (False, True), "both": (True, True), "one stream": (True, True)}
    for mode, (main_on, side_on) in expected.items():
        monkeypatch.setattr(text, "PARALLEL_BRANCHES", mode != "one stream")
        monkeypatch.setattr(text, "PDL_BRANCHES", "both" if mode == "one stream" else mode)
        calls.clear()
        md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32", engine_config=EngineConfig(max_running=4))
        try:
            assert_matches_golden(finished_request(md, SKILL_CASES[0]).skill.result(), SKILL_CASES[0])
            side = md.model.text.side_stream.stream_id
        finally:
            md.close()
        on_side = {on for stream, on in calls if stream == side}
        on_main = {on for stream, on in calls if stream != side}
        assert on_main == {main_on}, mode
        assert on_side == ({side_on} if mode != "one stream" else set()), mode


def test_images_encoded_ahead_on_their_own_stream_give_the_same_bits():
    """EngineConfig(encode_ahead=True) on CUDA: held-back requests' images are
    encoded on a second stream beside the running step; golden results, and
    every output logit equal to the engine's without it."""
    from conftest import distinct_image_cases, run_together_counting_encodes_ahead

    from tidal import EngineConfig, Moondream

    cases = distinct_image_cases(SKILL_CASES)
    traces, ahead = {}, {}
    for on in (False, True):
        md = Moondream.from_pretrained(GOLDEN, device="cuda", dtype="float32", engine_config=EngineConfig(token_budget=800, encode_ahead=on, trace_logits=True, max_running=8))
        try:
            reqs, ahead[on] = run_together_counting_encodes_ahead(md, cases)
            for c, r in zip(cases, reqs):
                assert_matches_golden(r.skill.result(), c)
            traces[on] = [[t.logits for t in r.trace] for r in reqs]
        finally:
            md.close()
    assert ahead[False] == 0 and ahead[True] > 0
    for a, b in zip(traces[False], traces[True]):
        assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))
