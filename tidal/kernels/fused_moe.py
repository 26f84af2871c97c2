"""Fused mixture-of-experts: grouped GEMMs over (token, expert) pairs sorted by
expert, reading only the experts in use.

1. align_by_expert: sort the T*k pairs by expert (stable) and pad each
   expert's run to a multiple of BLOCK_M, so every block of BLOCK_M rows
   belongs to one expert. Torch ops only: no host sync, graph-capturable,
   and the grid size depends on T alone.
2. up kernel: h, g = x @ fc1[e].T (both halves in one pass), the activation
   fused on the way out (gelu(h) * (g + 1) for Moondream 3, silu(h) * g for
   Qwen3's SwiGLU), one row per pair.
3. down kernel: y = act @ fc2[e].T, times the pair's routing weight, one row
   per pair.
4. the k rows of each token are summed in a fixed order (no atomics: the same
   inputs give the same bits, whatever the scheduling).

Block sizes: for a tuned (experts, hidden, inner, top-k, dtype, card) the
table in moe_configs.json (written by benchmarks/tune_moe.py on that card),
keyed by the number of tokens; for an untuned card, the table of the last
tuned card of its architecture (an H200 takes the H100's: the same SMs and
shared memory); otherwise a small default table (MOE_CONFIGS). A config is
(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for both kernels, or those five
for the up kernel and four more (BLOCK_N, BLOCK_K, warps, stages) for the
down kernel, whose shape differs (N = hidden, K = inner: at batch 1 a short
K loop); BLOCK_M is the layout's, shared by both.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from tidal.kernels.pdl import pdl_enter, pdl_on
from tidal.kernels.topk_softmax import topk_softmax_rows

if TYPE_CHECKING:
    from tidal.kernels.moe_route import UpRouting

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), optionally + the down kernel's (BLOCK_N, BLOCK_K, num_warps, num_stages)
MoeConfig = tuple[int, ...]

# tokens (upper bound) -> config
MOE_CONFIGS: list[tuple[int, MoeConfig]] = [
    (8, (16, 64, 128, 4, 4)),
    (64, (16, 64, 128, 4, 4)),
    (256, (32, 64, 128, 4, 4)),
    (1 << 30, (64, 128, 64, 8, 3)),
]

# the expert activations the up kernel fuses (tidal.layers.moe.ACTIVATIONS), by kernel code
ACT_CODES = {"geglu_plus1": 0, "swiglu": 1}


TUNED_FILE = Path(__file__).with_name("moe_configs.json")


def shape_key(experts: int, dim: int, inner: int, top_k: int, dtype: torch.dtype, device_name: str) -> str:
    """The tuned table's key: E, hidden, expert inner size, top-k, dtype and card."""
    return f"E{experts}-D{dim}-I{inner}-k{top_k}-{str(dtype).removeprefix('torch.')}-{device_name}"


@lru_cache(maxsize=1)
def _tuned() -> dict[str, list[tuple[int, MoeConfig]]]:
    if not TUNED_FILE.is_file():
        return {}
    raw = json.loads(TUNED_FILE.read_text())
    return {key: [(int(limit), tuple(int(v) for v in cfg)) for limit, cfg in table] for key, table in raw.items()}


@lru_cache(maxsize=64)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@lru_cache(maxsize=64)
def device_family(device: torch.device) -> str:
    """The card's architecture as the tuned table names it: "sm90" for Hopper."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def moe_config(tokens: int, shape: tuple[int, int, int, int] | None = None, dtype: torch.dtype | None = None, device: torch.device | None = None) -> MoeConfig:
    """The config (see MoeConfig) for a step of `tokens`; shape = (experts,
    hidden, inner, top_k) picks the tuned table when there is one for this
    dtype and card (or, failing that, its architecture)."""
    table = MOE_CONFIGS
    if shape is not None and dtype is not None and device is not None:
        tuned = _tuned()
        table = tuned.get(shape_key(*shape, dtype, _device_name(device))) or tuned.get(shape_key(*shape, dtype, device_family(device))) or MOE_CONFIGS
    cfg = next((cfg for limit, cfg in table if tokens <= limit), table[-1][1])
    if dtype is not None and device is not None:
        cfg = fit_stages(cfg, dtype.itemsize, shared_memory_bytes(device))
    return cfg


def fit_stages(cfg: MoeConfig, itemsize: int, shared_bytes: int) -> MoeConfig:
    """cfg with as many pipeline stages as fit the card's shared memory: the up
    kernel keeps an x tile and gate and up tiles per stage, and a float32 step
    doubles their bytes (a bf16 config of 3 stages asks 240 KiB in float32, past
    the H100's 227 KiB); the down kernel (where it has its own blocks) an
    activation tile and a weight tile."""

    def fit(stages: int, per_stage: int) -> int:
        return min(stages, max(1, int(shared_bytes * 0.9) // per_stage))  # a margin for the kernel's own scratch

    block_m, block_n, block_k, warps, stages = cfg[:5]
    up = (block_m, block_n, block_k, warps, fit(stages, (block_m * block_k + 2 * block_n * block_k) * itemsize))
    if len(cfg) == 5:
        return up
    d_n, d_k, d_warps, d_stages = cfg[5:]
    return up + (d_n, d_k, d_warps, fit(d_stages, (block_m * d_k + d_n * d_k) * itemsize))


def down_config(cfg: MoeConfig) -> tuple[int, int, int, int]:
    """The down kernel's (BLOCK_N, BLOCK_K, num_warps, num_stages): its own
    where the config has them, else the up kernel's."""
    if len(cfg) not in (5, 9):
        raise ValueError(f"a fused-MoE config has 5 or 9 values, not {len(cfg)}: {cfg}")
    return tuple(cfg[5:]) if len(cfg) == 9 else tuple(cfg[1:5])  # type: ignore[return-value]


@lru_cache(maxsize=8)
def shared_memory_bytes(device: torch.device) -> int:
    """Shared memory a block may opt into on this device (the fused MoE and skinny kernels size their pipelines by it)."""
    if device.type != "cuda":
        return 1 << 30  # the interpreter has no limit
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def max_blocks(pairs: int, num_experts: int, block_m: int) -> int:
    """How many BLOCK_M-row blocks the expert-sorted layout can need: each
    expert in use pads its run up to a multiple of block_m, so at most
    pairs // block_m full blocks plus one partly filled block per expert in
    use (no more experts than pairs). At batch 1 (8 pairs) that is 8 blocks,
    where the bound of padding every expert gave 121 (E=128): the expert
    GEMMs' grids shrink with it, and launched programs that would only exit
    cost time too."""
    return min(triton.cdiv(pairs + num_experts * (block_m - 1), block_m), pairs // block_m + min(num_experts, pairs))


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (pairs [NB * block_m] int32: pair index t * k + j in
    expert order, T * k where padding; block_expert [NB] int32: each block's
    expert, num_experts for blocks past the end)."""
    flat = topk_ids.reshape(-1)
    pairs = flat.numel()
    nblocks = max_blocks(pairs, num_experts, block_m)
    ones = torch.ones_like(flat)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, ones)
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    first_of = torch.cumsum(counts, 0) - counts
    rank = torch.arange(pairs, device=flat.device) - first_of[expert_of]
    dest = (pad_end - padded)[expert_of] + rank
    sorted_pairs = torch.full((nblocks * block_m,), pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(nblocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(pad_end, starts, right=True).to(torch.int32)
    return sorted_pairs, block_expert


@triton.jit
def _gelu_exact(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _moe_up_kernel(
    X, W, Out, Pairs, BlockExpert,
    Partial, RBias, RWeights, RIds,
    num_pairs, top_k, num_experts, inner, dim, router_programs,
    stride_xt, stride_we, stride_wn, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr,
    ROUTE: tl.constexpr, NE: tl.constexpr, KT: tl.constexpr, PROWS: tl.constexpr, ROWS: tl.constexpr, R_BIAS: tl.constexpr, RENORM: tl.constexpr,
):
    """ROUTE (one token): the block's expert and pair come from the router
    programs' partials, routed here (_route_one_token) instead of from the
    layout in Pairs / BlockExpert, which this kernel then writes."""
    pdl_enter(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if ROUTE:
        e, rows = _route_one_token(
            Partial, RBias, RWeights, RIds, Pairs, BlockExpert, pid_m, pid_n, num_experts, num_pairs, router_programs,
            X.dtype.element_ty, BLOCK_M, NE, KT, PROWS, ROWS, R_BIAS, RENORM,
        )
    else:
        e = tl.load(BlockExpert + pid_m).to(tl.int64)
        rows = tl.load(Pairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    if e >= num_experts:
        return
    valid = rows < num_pairs
    tok = (rows // top_k).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < inner
    w_base = W + e * stride_we
    acc_h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < dim
        x = tl.load(X + tok[:, None] * stride_xt + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        wh = tl.load(w_base + n[None, :] * stride_wn + kk[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
        wg = tl.load(w_base + (n + inner)[None, :] * stride_wn + kk[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
        if IEEE:
            acc_h += tl.dot(x, wh, input_precision="ieee")
            acc_g += tl.dot(x, wg, input_precision="ieee")
        else:
            acc_h += tl.dot(x, wh)
            acc_g += tl.dot(x, wg)
    if ACT == 1:  # swiglu: silu(h) * g
        act = acc_h / (1.0 + tl.exp(-acc_h)) * acc_g
    else:  # geglu_plus1: gelu(h) * (g + 1)
        act = _gelu_exact(acc_h) * (acc_g + 1.0)
    tl.store(Out + rows[:, None].to(tl.int64) * stride_ot + n[None, :], act.to(Out.dtype.element_ty), mask=valid[:, None] & nmask[None, :])


@triton.jit
def _route_one_token(
    Partial, RBias, RWeights, RIds, Pairs, BlockExpert, pid_m, pid_n, num_experts, num_pairs, router_programs,
    dtype: tl.constexpr, BLOCK_M: tl.constexpr, NE: tl.constexpr, KT: tl.constexpr, PROWS: tl.constexpr, ROWS: tl.constexpr, R_BIAS: tl.constexpr, RENORM: tl.constexpr,
):
    """One token's routing, as the fused router's ticket program does it: its
    partials summed in program order (+ bias), rounded to the activation
    dtype, the top KT (topk_softmax_rows). Pair j goes to block rank_j of
    the expert-sorted layout (the experts in ascending order, pair order on
    a tie), so block pid_m takes the pair ranked pid_m; blocks past KT take
    none. With distinct experts that is align_by_expert's layout for one
    token; where the top k repeats an expert (fewer than k finite logits)
    each pair still gets a block of its own, where align_by_expert would
    share one, and every pair's output is the same either way. The column-0 programs write
    their block's layout entries and program (0, 0) the weights and ids, for
    the down kernel. -> (this block's expert, E where none; its rows)."""
    ev = tl.arange(0, NE)
    kk = tl.arange(0, KT)
    # a [ROWS, NE] tile (ROWS: the program's warps) of which row 0 is the
    # token, the others zeros: a row a warp, so the top-k's reductions stay
    # within warps (compiled for sm_90 with 4 warps and 128 experts: 15
    # barriers before the first weight load, against 33 for a [1, NE] row)
    t = tl.arange(0, ROWS)
    total = tl.zeros([ROWS, NE], tl.float32)
    for q in range(0, router_programs):
        total += tl.load(Partial + q * PROWS * NE + t[:, None] * NE + ev[None, :], mask=t[:, None] == 0, other=0.0, cache_modifier=".cg")
    if R_BIAS:
        total += tl.load(RBias + ev).to(tl.float32)[None, :]
    w, ids = topk_softmax_rows(total.to(dtype).to(tl.float32), ev, kk, NE, KT, RENORM)
    w = tl.sum(tl.where(t[:, None] == 0, w, 0.0), axis=0)  # [KT]: row 0's
    ids = tl.sum(tl.where(t[:, None] == 0, ids, 0), axis=0)
    before = (ids[None, :] < ids[:, None]) | ((ids[None, :] == ids[:, None]) & (kk[None, :] < kk[:, None]))  # [j, i]: pair i sorts before pair j
    mine = tl.sum(before.to(tl.int32), axis=1) == pid_m
    pair = tl.sum(tl.where(mine, kk, 0), axis=0)
    e = tl.where(tl.sum(mine.to(tl.int32), axis=0) > 0, tl.sum(tl.where(mine, ids, 0), axis=0), num_experts).to(tl.int64)  # (a NaN row's ids are E: no expert)
    r = tl.arange(0, BLOCK_M)
    rows = tl.where((r == 0) & (e < num_experts), pair, num_pairs)
    if pid_n == 0:
        tl.store(BlockExpert + pid_m, e.to(tl.int32))
        tl.store(Pairs + pid_m * BLOCK_M + r, rows.to(tl.int32))
        if pid_m == 0:
            tl.store(RIds + kk, ids.to(tl.int64))
            tl.store(RWeights + kk, w.to(RWeights.dtype.element_ty))
    return e, rows


@triton.jit
def _moe_down_kernel(
    A, W, Out, Pairs, BlockExpert, Weights,
    num_pairs, num_experts, dim, inner,
    stride_at, stride_we, stride_wn, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BlockExpert + pid_m).to(tl.int64)
    if e >= num_experts:
        return
    rows = tl.load(Pairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < num_pairs
    rows64 = rows.to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < dim
    w_base = W + e * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inner, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < inner
        a = tl.load(A + rows64[:, None] * stride_at + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_base + n[None, :] * stride_wn + kk[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    weight = tl.load(Weights + rows64, mask=valid, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    tl.store(Out + rows64[:, None] * stride_ot + n[None, :], acc.to(Out.dtype.element_ty), mask=valid[:, None] & nmask[None, :])


def experts_up(
    x: torch.Tensor, fc1: torch.Tensor, top_k: int, pairs: torch.Tensor, block_expert: torch.Tensor, config: MoeConfig, act: str = "geglu_plus1",
    route: UpRouting | None = None,
) -> torch.Tensor:
    """The up kernel: each pair's activation act(x[t] @ fc1[e].T) [T * k, I]
    (pair t * k + j), over the expert-sorted layout made with config's BLOCK_M.
    route (one token; moe_route.router_for_up): the kernel routes the token
    from the router's partials and writes that layout (pairs, block_expert)
    and route's weights and ids itself."""
    tokens = x.shape[0]
    num_experts, two_inner, dim = fc1.shape
    inner = two_inner // 2
    block_m, block_n, block_k, warps, stages = config[:5]
    assert x.stride(1) == fc1.stride(2) == 1
    num_pairs = tokens * top_k
    hidden = torch.empty((num_pairs, inner), dtype=x.dtype, device=x.device)
    if route is not None:
        assert tokens == 1 and num_experts & (num_experts - 1) == 0 and top_k & (top_k - 1) == 0
        r_args = (route.partial, route.bias if route.bias is not None else route.partial, route.weights, route.ids)
        r_consts = dict(ROUTE=True, NE=num_experts, KT=top_k, PROWS=route.rows_per_program, ROWS=warps, R_BIAS=route.bias is not None, RENORM=route.renormalize)
        programs = route.programs
    else:
        r_args = (hidden, hidden, hidden, hidden)  # never read
        r_consts = dict(ROUTE=False, NE=1, KT=1, PROWS=1, ROWS=1, R_BIAS=False, RENORM=True)
        programs = 0
    pdl = pdl_on(x.device)
    _moe_up_kernel[(block_expert.shape[0], triton.cdiv(inner, block_n))](
        x, fc1, hidden, pairs, block_expert, *r_args,
        num_pairs, top_k, num_experts, inner, dim, programs,
        x.stride(0), fc1.stride(0), fc1.stride(1), hidden.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32, ACT=ACT_CODES[act], PDL=pdl, **r_consts,
        num_warps=warps, num_stages=stages, launch_pdl=pdl,
    )
    return hidden


def experts_down(hidden: torch.Tensor, weights: torch.Tensor, fc2: torch.Tensor, pairs: torch.Tensor, block_expert: torch.Tensor, config: MoeConfig) -> torch.Tensor:
    """The down kernel: each pair's output hidden[p] @ fc2[e].T times its
    routing weight [T * k, D], with down_config(config)'s blocks."""
    num_experts, dim, inner = fc2.shape
    block_n, block_k, warps, stages = down_config(config)
    assert hidden.stride(1) == fc2.stride(2) == 1
    num_pairs = hidden.shape[0]
    per_pair = torch.empty((num_pairs, dim), dtype=hidden.dtype, device=hidden.device)
    pdl = pdl_on(hidden.device)
    _moe_down_kernel[(block_expert.shape[0], triton.cdiv(dim, block_n))](
        hidden, fc2, per_pair, pairs, block_expert, weights.reshape(-1),
        num_pairs, num_experts, dim, inner,
        hidden.stride(0), fc2.stride(0), fc2.stride(1), per_pair.stride(0),
        BLOCK_M=config[0], BLOCK_N=block_n, BLOCK_K=block_k, IEEE=hidden.dtype == torch.float32, PDL=pdl,
        num_warps=warps, num_stages=stages, launch_pdl=pdl,
    )
    return per_pair


def expert_pairs(
    x: torch.Tensor,
    weights: torch.Tensor,
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    top_k: int,
    pairs: torch.Tensor,
    block_expert: torch.Tensor,
    config: MoeConfig,
    act: str = "geglu_plus1",
    route: UpRouting | None = None,
) -> torch.Tensor:
    """Each (token, expert) pair's weighted output, [T * k, D] (pair t * k + j),
    given the expert-sorted layout of align_by_expert / route_and_align made
    with config's BLOCK_M; act names the expert activation (ACT_CODES).
    route: the up kernel routes one token itself and writes the layout and
    weights (see experts_up)."""
    hidden = experts_up(x, fc1, top_k, pairs, block_expert, config, act, route)
    return experts_down(hidden, weights, fc2, pairs, block_expert, config)


def fused_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, act: str = "geglu_plus1") -> torch.Tensor:
    """x [T, D]; weights/ids [T, k] (routing); fc1 [E, 2I, D]; fc2 [E, D, I] -> [T, D].

    out[t] = sum_j weights[t, j] * (act(x[t] @ fc1[e].T) @ fc2[e].T), e = ids[t, j],
    act(h, g) = gelu(h) * (g + 1) or silu(h) * g, summed over j in order.
    """
    tokens, top_k = ids.shape
    config = moe_config(tokens, (fc1.shape[0], fc1.shape[2], fc2.shape[2], top_k), x.dtype, x.device)
    pairs, block_expert = align_by_expert(ids, fc1.shape[0], config[0])
    per_pair = expert_pairs(x, weights, fc1, fc2, top_k, pairs, block_expert, config, act)
    return per_pair.view(tokens, top_k, -1).sum(dim=1)
