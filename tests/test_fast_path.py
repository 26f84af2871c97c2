"""The fast path end to end (fused tau/rotary/KV write, Triton paged attention,
fused MoE) through the engine, held to the golden fixture and to the torch
path's logits. On a GPU it runs natively; without one, under Triton's CPU
interpreter (slow, so a handful of cases)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import (
    GOLDEN,
    assert_matches_golden,
    finished_request,
    golden_cases,
    prepare_case,
)

pytest.importorskip("triton")

import tidal  # noqa: E402
from tidal import EngineConfig  # noqa: E402
from tidal.engine.request import Request  # noqa: E402


def _one(kind: str, image: str | None, **match) -> dict:
    return next(c for c in golden_cases(kind) if c["image"] == image and all(c.get(k) == v for k, v in match.items()))


CASES = [
    _one("query", "wide", reasoning=False, spatial_refs=None),
    _one("query", "tall", reasoning=True),
    next(c for c in golden_cases("query") if c["image"] == "square378" and c.get("spatial_refs")),
    _one("query", None),
    _one("caption", "square378", length="long"),
    _one("detect", "wide"),
    _one("point", "tall"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def _counting_launches():
    """Count, while open, the launches of the kernels behind process-wide
    settings (moe_route.FUSED_ROUTER, tau_rope.LIN_KERNEL) -> {name: count}."""
    from tidal.kernels import moe_route, tau_rope

    counts = {"router_route_and_align": 0, "tau_lin": 0}
    router, lin = moe_route.router_route_and_align, tau_rope._tau_lin_kernel

    def counted_router(*a, **k):
        counts["router_route_and_align"] += 1
        return router(*a, **k)

    class CountedLin:
        def __getitem__(self, grid):
            counts["tau_lin"] += 1
            return lin[grid]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moe_route, "router_route_and_align", counted_router)
        mp.setattr(tau_rope, "_tau_lin_kernel", CountedLin())
        yield counts


@pytest.fixture(scope="module")
def runs():
    """Each case on the torch path and on the fast path, alone; then all of
    them at once on the fast path (mixed prefill and decode steps)."""
    out = {}
    for kernels in (False, True):
        # counted from the start: on a GPU the decode steps replay graphs captured while loading
        with _counting_launches() as launches:
            md = tidal.Moondream.from_pretrained(GOLDEN, device=DEVICE, dtype="float32", engine_config=EngineConfig(trace_logits=True, kernels=kernels, token_budget=60_000))
            try:
                out[kernels] = [finished_request(md, case) for case in CASES]
                if kernels:  # then all at once, stepped here so that they surely share steps
                    out["launches"] = dict(launches)
                    reqs = [Request(skill=skill, pending=items, bidir_len=bidir) for skill, items, bidir in (prepare_case(md, c) for c in CASES)]
                    for r in reqs:
                        md.engine.add_request(r)
                    while md.engine.has_work():
                        md.engine.step()
                    out["batched"] = reqs
                    assert md.engine.stats.max_batch == len(CASES)
            finally:
                md.close()
    return out


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: f"{CASES[i]['kind']}-{CASES[i]['image']}")
def test_fast_path_gives_the_reference_results(runs, i):
    assert_matches_golden(runs[True][i].skill.result(), CASES[i])
    assert_matches_golden(runs["batched"][i].skill.result(), CASES[i])


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: f"{CASES[i]['kind']}-{CASES[i]['image']}")
def test_fast_path_logits_equal_the_torch_path(runs, i):
    torch_req, fast_req, batched = runs[False][i], runs[True][i], runs["batched"][i]
    assert len(torch_req.trace) == len(fast_req.trace) == len(batched.trace) > 0
    for want, got, got_b in zip(torch_req.trace, fast_req.trace, batched.trace):
        for name in ("logits", "coord", "size"):
            assert _rel(getattr(got, name), getattr(want, name)) <= 1e-5, name
            assert _rel(getattr(got_b, name), getattr(want, name)) <= 1e-5, name


def test_the_default_fast_path_launches_what_its_settings_say(runs):
    """The fixture's fast path (every setting at its default; its load, which
    captures the decode graphs on a GPU, included) ran the fused router
    exactly when moe_route.FUSED_ROUTER is on and tau's projection kernel
    exactly when tau_rope.LIN_KERNEL is on. The tests below run the other
    value of each."""
    from tidal.kernels import moe_route, tau_rope

    assert (runs["launches"]["router_route_and_align"] > 0) == moe_route.FUSED_ROUTER
    assert (runs["launches"]["tau_lin"] > 0) == tau_rope.LIN_KERNEL


def _flipped(module_name: str, setting: str) -> list[bool]:
    """Both values of a process-wide setting on a GPU; on the CPU (Triton's
    interpreter: slow) only the one the default fast path does not run."""
    import importlib

    default = getattr(importlib.import_module(module_name), setting)
    return [True, False] if torch.cuda.is_available() else [not default]


@pytest.mark.parametrize("fused_router", _flipped("tidal.kernels.moe_route", "FUSED_ROUTER"))
def test_the_router_fused_into_the_routing_launch_changes_no_result(runs, monkeypatch, fused_router):
    """moe_route.FUSED_ROUTER (on by default): decode steps' router product
    runs inside the routing launch, or (off) as a linear before it; either
    way a detect and a query case match the golden results, every logit
    stays within 1e-5 of the default fast path's, and the fused launch runs
    exactly when it is on."""
    from tidal.kernels import moe_route

    monkeypatch.setattr(moe_route, "FUSED_ROUTER", fused_router)
    assert bool(_golden_cases_match_the_default_fast_path(runs, monkeypatch, moe_route, "router_route_and_align")) == fused_router


@pytest.mark.parametrize("lin_kernel", _flipped("tidal.kernels.tau_rope", "LIN_KERNEL"))
def test_tau_projection_as_one_kernel_changes_no_result(runs, monkeypatch, lin_kernel):
    """tau_rope.LIN_KERNEL: tau's projection past 64 positions (the image
    prefix) as one Triton kernel, or (off, the default) torch's float32
    ops; either way a detect and a query case match the golden results and
    every logit stays within 1e-5 of the default fast path's, and the
    kernel runs exactly when it is on."""
    from tidal.kernels import tau_rope

    monkeypatch.setattr(tau_rope, "LIN_KERNEL", lin_kernel)
    with _counting_launches() as launches:
        _golden_cases_match_the_default_fast_path(runs, monkeypatch, tau_rope, "tau_projection")
    assert bool(launches["tau_lin"]) == lin_kernel


def _golden_cases_match_the_default_fast_path(runs, monkeypatch, module, kernel: str) -> int:
    """A detect and a query golden case on a fresh fast-path engine (float32)
    match the golden results and stay within 1e-5 of the default fast path's
    every logit, coordinate and size; -> how many times module.kernel ran."""
    calls = []
    real = getattr(module, kernel)
    monkeypatch.setattr(module, kernel, lambda *a, **k: calls.append(1) or real(*a, **k))
    md = tidal.Moondream.from_pretrained(GOLDEN, device=DEVICE, dtype="float32", engine_config=EngineConfig(trace_logits=True, kernels=True, token_budget=60_000))
    try:
        for i in (0, 5):
            req = finished_request(md, CASES[i])
            assert_matches_golden(req.skill.result(), CASES[i])
            for want, got in zip(runs[True][i].trace, req.trace, strict=True):
                for name in ("logits", "coord", "size"):
                    assert _rel(getattr(got, name), getattr(want, name)) <= 1e-5, name
    finally:
        md.close()
    return len(calls)


def test_the_vision_encoder_with_fused_residual_norms_equals_the_torch_path(monkeypatch):
    """The fast path's encoder (each residual add with the LayerNorm after it
    in one kernel; on CUDA only, the interpreter runs a program per patch)
    gives the torch blocks' features within 1e-5, and the fused kernel really
    ran: once per residual add. A small random encoder of the real layout."""
    from tidal.models.moondream3 import vision
    from tidal.models.moondream3.config import VisionConfig

    torch.manual_seed(5)
    cfg = VisionConfig(enc_dim=48, enc_n_layers=3, enc_ff_dim=80, enc_n_heads=2, crop_size=70)
    enc = vision.VisionModel(cfg).to(DEVICE)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    crops = torch.rand(2, 3, cfg.crop_size, cfg.crop_size, device=DEVICE) * 2 - 1
    with torch.inference_mode():
        want = enc.encode_crops(crops)
        calls = []
        fused = vision.residual_norm
        monkeypatch.setattr(vision, "residual_norm", lambda *a: calls.append(1) or fused(*a))
        enc.fused_norms = True
        got = enc.encode_crops(crops)
    assert len(calls) == 2 * cfg.enc_n_layers
    assert got.shape == want.shape == (2, cfg.n_image_tokens, cfg.enc_dim)
    assert _rel(got, want) <= 1e-5
