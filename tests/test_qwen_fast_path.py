"""The Qwen models' fused path (tidal.kernels: q/k norm + rotary + KV write,
residual add + RMSNorm, routing and SwiGLU experts; Triton paged attention)
held to their torch path, float32, every output's logits: Qwen3-MoE in both
config variants, Qwen3-VL dense and MoE with images (deepstack after the
fused layers, M-RoPE positions). On a GPU the fused path's decode steps
replay CUDA graphs (3-axis rotary positions from the static buffers); without
one it runs under Triton's CPU interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("transformers")

import test_qwen3_moe as moe_tests  # noqa: E402
import test_qwen3_vl as vl_tests  # noqa: E402

import tidal  # noqa: E402
from tidal.engine.engine import EngineConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _load(folder, kernels: bool, dtype: str = "float32"):
    return tidal.LLM.from_pretrained(folder, device=DEVICE, dtype=dtype, engine_config=EngineConfig(trace_logits=True, max_running=4, kernels=kernels))


def _both(folder, run):
    out = {}
    for kernels in (False, True):
        llm = _load(folder, kernels)
        try:
            out[kernels] = run(llm)
            graphs = llm.engine.runner.graphs
            out[f"replays{kernels}"] = graphs.replays if graphs is not None else 0
        finally:
            llm.close()
    return out


@pytest.mark.parametrize("variant", sorted(moe_tests.VARIANTS))
def test_qwen3_moe_fused_path_gives_the_torch_paths_logits(tmp_path_factory, variant):
    _, folder = moe_tests._checkpoint(tmp_path_factory, variant)
    prompts = moe_tests.PROMPTS[:3]
    out = _both(folder, lambda llm: moe_tests._run(llm, prompts, 6))
    for (want_tokens, want), (tokens, got) in zip(out[False], out[True]):
        assert tokens == want_tokens
        assert got.shape == want.shape and moe_tests._rel(got.cpu(), want.cpu()) <= 1e-4
    if DEVICE == "cuda":
        assert out["replaysTrue"] > 0  # decode steps ran as graphs


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_qwen3_vl_fused_path_gives_the_torch_paths_logits(tmp_path_factory, variant):
    _, folder = vl_tests._save(tmp_path_factory, variant)
    cases = [(vl_tests.CASES[n][0], [vl_tests._image(*s) for s in vl_tests.CASES[n][1]]) for n in sorted(vl_tests.CASES)]
    out = _both(folder, lambda llm: vl_tests._run(llm, cases, 5))
    for (want_tokens, want), (tokens, got) in zip(out[False], out[True]):
        assert tokens == want_tokens
        assert got.shape == want.shape and vl_tests._rel(got.cpu(), want.cpu()) <= 1e-4
    if DEVICE == "cuda":
        assert out["replaysTrue"] > 0


def test_a_float8_kv_cache_gives_the_same_logits_on_both_paths(tmp_path_factory):
    """EngineConfig.kv_dtype="fp8": the pool holds float8 e4m3; the fused path
    (its kernels write and read the float8 cache) gives the torch path's
    tokens and logits (within 1e-4: both store the same rounding of the same
    values); the prompt's logits differ from an exact cache's by float8's
    rounding: far more than the paths differ from each other, far less than
    unrelated logits would."""
    _, folder = moe_tests._checkpoint(tmp_path_factory, "base")
    prompts = moe_tests.PROMPTS[:3]
    out, pools = {}, {}
    for kernels, kv_dtype in ((False, "fp8"), (True, "fp8"), (False, "auto")):
        llm = tidal.LLM.from_pretrained(folder, device=DEVICE, dtype="float32", engine_config=EngineConfig(trace_logits=True, max_running=4, kernels=kernels, kv_dtype=kv_dtype))
        try:
            out[kernels, kv_dtype] = moe_tests._run(llm, prompts, 6)
            pools[kernels, kv_dtype] = llm.engine.kv_pool.k.dtype
        finally:
            llm.close()
    assert pools[False, "fp8"] == pools[True, "fp8"] == torch.float8_e4m3fn and pools[False, "auto"] == torch.float32
    for (want_tokens, want), (tokens, got), (_, exact) in zip(out[False, "fp8"], out[True, "fp8"], out[False, "auto"]):
        assert tokens == want_tokens
        assert moe_tests._rel(got.cpu(), want.cpu()) <= 1e-4
        # against the exact cache, the prompt's output (later ones compound the
        # rounding through this tiny random model's sharp attention, and part at their first different token)
        assert 1e-3 <= moe_tests._rel(want[0].cpu(), exact[0].cpu()) <= 0.3


@pytest.mark.skipif(DEVICE != "cuda", reason="programmatic dependent launch needs an sm_90 GPU")
def test_programmatic_dependent_launch_changes_no_bit(tmp_path_factory, monkeypatch):
    """tidal.kernels.pdl on (the decode chain's kernels launched with PDL,
    each waiting for its predecessor before any access to its output, in the
    captured graphs too), plain and with its early-weights form (the router
    and skinny products load weights before the wait): every token and logit
    equals the fused path's with PDL off, bit for bit; on an sm_90 card the
    graphs were captured with it."""
    from tidal.kernels import pdl

    if not pdl.available(torch.device("cuda")):
        pytest.skip("needs sm_90 and Triton's grid-dependency ops")
    _, folder = moe_tests._checkpoint(tmp_path_factory, "base")
    prompts = moe_tests.PROMPTS[:3]
    out = {}
    for on, early in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(pdl, "ENABLED", on)
        monkeypatch.setattr(pdl, "EARLY_WEIGHTS", early)
        llm = _load(folder, True, "bfloat16")  # (the early-weights form is for 16-bit weights)
        try:
            assert pdl.pdl_on(llm.engine.runner.device) == on and pdl.early_weights_on(llm.engine.runner.device) == early
            out[on, early] = [moe_tests._run(llm, [p], 6)[0] for p in prompts]  # one at a time: the same steps each way
            assert llm.engine.runner.graph_replays > 0
        finally:
            llm.close()
    for form in ((True, False), (True, True)):
        for (want_tokens, want), (tokens, got) in zip(out[False, False], out[form]):
            assert tokens == want_tokens and torch.equal(got, want), form


def test_one_token_routed_in_the_up_kernel_changes_no_token(tmp_path_factory, monkeypatch):
    """moe_route.ROUTE_IN_UP: a request decoding alone (one token a step)
    routes each MoE layer in the experts' up kernel from the router
    programs' partials, and gives the fused path's tokens and logits
    without it (within float32 rounding; on the device in bf16 too, and
    there the fused router's bits); the form really ran (router_for_up was
    called) exactly when on."""
    from tidal.kernels import moe_route

    _, folder = moe_tests._checkpoint(tmp_path_factory, "base")
    prompts = moe_tests.PROMPTS[:2]
    calls = []
    real = moe_route.router_for_up
    monkeypatch.setattr(moe_route, "router_for_up", lambda *a, **k: calls.append(1) or real(*a, **k))
    dtypes = ("float32", "bfloat16") if DEVICE == "cuda" else ("float32",)
    for dtype in dtypes:
        out = {}
        for on in (False, True):
            monkeypatch.setattr(moe_route, "ROUTE_IN_UP", on)
            calls.clear()
            llm = _load(folder, True, dtype)
            try:
                out[on] = [moe_tests._run(llm, [p], 6)[0] for p in prompts]  # one at a time: one token a decode step
            finally:
                llm.close()
            assert bool(calls) == on
        for (want_tokens, want), (tokens, got) in zip(out[False], out[True]):
            assert tokens == want_tokens
            if dtype == "bfloat16":
                assert torch.equal(got, want)
            else:
                assert moe_tests._rel(got.cpu(), want.cpu()) <= 1e-5
