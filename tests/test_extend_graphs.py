"""Extend steps from static buffers (tidal.runner.extend_graphs: what CUDA
graphs of prefill and mixed steps replay) give the eager runner's outputs:
every step of several requests run together (image prefixes, text, detect's
coordinate feedback, decode rows), each run both ways on the same inputs,
tokens equal and raw heads within 1e-5 (float32). On the CPU the static path
runs eagerly under Triton's interpreter; on a GPU the same function is
graph-captured (test_cuda compares replays)."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN, golden_cases, prepare_case

pytest.importorskip("triton")

import tidal  # noqa: E402
from tidal import EngineConfig  # noqa: E402
from tidal.core import CoordInput, ImageInput, SizeInput, item_len  # noqa: E402
from tidal.engine.request import Request  # noqa: E402
from tidal.runner.extend_graphs import ExtendGraphs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _compare_every_step(engine, graphs: ExtendGraphs) -> tuple[list[int], list[bool], list[int]]:
    """Wrap the runner: each step runs eagerly (whose results the engine keeps)
    and from the static buffers; -> per step compared: its positions, whether
    it fed coordinates or sizes back, how many images it held."""
    runner = engine.runner
    eager = runner.run
    compared, feedback, images = [], [], []

    def both(steps, trace=False):
        want = eager(steps, trace=True)
        if graphs.can_run(steps):
            got = graphs.run(steps, replay=False, trace=True)
            for w, g in zip(want, got):
                assert (w is None) == (g is None)
                if w is None:
                    continue
                assert (g.token, g.coord_bin, g.size_bins, g.coord_over_eos) == (w.token, w.coord_bin, w.size_bins, w.coord_over_eos)
                assert set(g.trace.heads) == set(w.trace.heads)
                for name, tensor in w.trace.heads.items():
                    assert _rel(g.trace.heads[name], tensor) <= 1e-5, name
            compared.append(sum(item_len(i) for s in steps for i in s.items))
            feedback.append(any(isinstance(i, (CoordInput, SizeInput)) for s in steps for i in s.items))
            images.append(sum(isinstance(i, ImageInput) for s in steps for i in s.items))
        return want

    runner.run = both
    return compared, feedback, images


def test_moondream_steps_from_static_buffers_equal_eager():
    md = tidal.Moondream.from_pretrained(GOLDEN, device=DEVICE, dtype="float32", engine_config=EngineConfig(kernels=True, cuda_graphs=False, token_budget=2048))
    try:
        graphs = ExtendGraphs(md.engine.runner, max_sequences=4, max_tokens=1536, buckets=(128, 1536))
        compared, feedback, _ = _compare_every_step(md.engine, graphs)
        cases = [
            next(c for c in golden_cases("query") if c["image"] == "wide" and not c["reasoning"]),
            next(c for c in golden_cases("detect") if c["image"] == "tall"),
            next(c for c in golden_cases("query") if c["image"] is None),
        ]
        reqs = []
        for c in cases:
            skill, items, bidir = prepare_case(md, c)
            reqs.append(Request(skill=skill, pending=items, bidir_len=bidir))
            md.engine.add_request(reqs[-1])
        steps = 0
        while md.engine.has_work() and steps < 6:
            md.engine.step()
            steps += 1
        assert graphs.eager_runs == len(compared) >= 4
        assert max(compared) > 1460  # both image prefixes went through the static path
        assert any(feedback)  # and detect's coordinates fed back
    finally:
        md.close()


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_qwen3_vl_steps_from_static_buffers_equal_eager(tmp_path_factory, variant):
    """Images anywhere in the prompt (their deepstack features from the static
    buffer, their M-RoPE indices from the per-position fields), text, decode rows."""
    import test_qwen3_vl as vl

    _, folder = vl._save(tmp_path_factory, variant)
    llm = tidal.LLM.from_pretrained(folder, device=DEVICE, dtype="float32", engine_config=EngineConfig(kernels=True, cuda_graphs=False))
    try:
        graphs = ExtendGraphs(llm.engine.runner, max_sequences=4, max_tokens=256, buckets=(32, 256))
        compared, _, images = _compare_every_step(llm.engine, graphs)
        cases = [(vl.CASES[n][0], [vl._image(*s) for s in vl.CASES[n][1]]) for n in sorted(vl.CASES)]
        vl._run(llm, cases, 4)
        assert graphs.eager_runs == len(compared) >= 4
        assert sum(images) == 3  # all three images' prefills went through the static path
    finally:
        llm.close()
