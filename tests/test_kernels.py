"""Each Triton kernel against its torch reference, on fresh random inputs of
several shapes, with outputs poisoned (NaN) before every run.

On a GPU: real shapes, float32 (tight) and bfloat16 (within 1e-2). Without one:
small shapes under Triton's CPU interpreter (conftest sets TRITON_INTERPRET),
float32 only, so CI checks the kernels' logic on every commit.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tidal.kernels.kv_store import cache_value  # noqa: E402
from tidal.kernels.l2_prefetch import row_block_span  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (NaN, e.g. from an unwritten output, never passes)."""
    err = float((a.double() - b.double()).norm() / b.double().norm())
    return err if err == err else float("inf")


# -- paged attention ------------------------------------------------------------------------
def _paged_cache(seqs: list[tuple[int, int, int]], heads_kv: int, dim: int, dtype, gen):
    """seqs: (q_len, kv_len, bidir) each. Every sequence's positions live in
    random, scattered slots; returns the cache, the table, and per-sequence slots."""
    total = sum(kv for _, kv, _ in seqs)
    n_slots = total + 17
    perm = torch.randperm(n_slots - 1, generator=gen)[:total] + 1  # slot 0 stays unused
    k = torch.randn(n_slots, heads_kv, dim, generator=gen).to(dtype)
    v = torch.randn(n_slots, heads_kv, dim, generator=gen).to(dtype)
    max_ctx = max(kv for _, kv, _ in seqs) + 5
    table = torch.zeros(len(seqs) + 2, max_ctx, dtype=torch.int64)
    rows, used = [], 0
    for i, (_, kv, _) in enumerate(seqs):
        row = len(seqs) + 1 - i  # rows in another order than the batch
        table[row, :kv] = perm[used : used + kv]
        used += kv
        rows.append(row)
    return k, v, table, rows


def _reference_attention(q, k, v, table, rows, seqs):
    """float64, one sequence at a time, with the mask rule spelled out."""
    out, start = [], 0
    groups = q.shape[1] // k.shape[1]
    for (q_len, kv_len, bidir), row in zip(seqs, rows):
        slots = table[row, :kv_len]
        keys = k[slots].double().repeat_interleave(groups, dim=1)
        vals = v[slots].double().repeat_interleave(groups, dim=1)
        qs = q[start : start + q_len].double()
        qpos = torch.arange(kv_len - q_len, kv_len)[:, None]
        kpos = torch.arange(kv_len)[None, :]
        seen = (kpos <= qpos) | ((kpos < bidir) & (qpos < bidir))
        scores = torch.einsum("qhd,khd->hqk", qs, keys) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~seen[None], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals))
        start += q_len
    return torch.cat(out)


DECODE_CASES = [
    # (kv lens, heads, kv heads, splits per sequence or None: the default): one sequence, several, long
    # contexts, GQA; sequences shorter than their splits' tiles (empty splits)
    ([9], 2, 2, 1),
    ([1, 130, 64, 257], 4, 4, 4),
    ([731, 5, 300], 4, 2, 3),
    ([70, 1, 33], 8, 1, 32),
    ([40, 7], 4, 2, 1),  # GQA, one split: the split kernel writes the output itself
    ([90, 300, 2], 8, 2, None),  # the kernel's own choice (decode_splits)
] + ([([4096, 740, 1500, 33] * 8, 32, 32, 4), ([750] * 64, 32, 32, 1), ([3000, 17], 32, 4, 32), ([512] * 16 + [3], 32, 8, 8)] if CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"B{len(c[0])}-H{c[1]}/{c[2]}-splits{c[3]}")
def test_decode_attention(case, dtype):
    from tidal.kernels.paged_attention import decode_attention

    kv_lens, heads, heads_kv, splits = case
    gen = torch.Generator().manual_seed(len(kv_lens) * 31 + heads)
    dim = 64
    seqs = [(1, n, 0) for n in kv_lens]
    k, v, table, rows = _paged_cache(seqs, heads_kv, dim, dtype, gen)
    q = torch.randn(len(seqs), heads, dim, generator=gen).to(dtype)
    want = _reference_attention(q, k, v, table, rows, seqs)
    out = torch.full_like(q, float("nan"), device=DEV)
    got = decode_attention(
        q.to(DEV), k.to(DEV), v.to(DEV), table.to(DEV),
        torch.tensor(rows, device=DEV), torch.tensor(kv_lens, dtype=torch.int32, device=DEV),
        num_splits=splits, out=out,
    )
    assert got is out
    assert rel(got.cpu(), want) <= tol(dtype)


@pytest.mark.parametrize("tile, cache, prefetch", [((32, 4, 4), "model", False), ((128, 8, 2), "model", False), ((64, 4, 5), "fp8", False), ((64, 4, 3), "model", True), ((32, 4, 4), "fp8", True)], ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_grouped_decode_attention_with_other_tiles(tile, cache, prefetch, splits, monkeypatch):
    """The grouped (GQA) kernel with another (BLOCK_N, warps, stages) than the
    default (bench_kernels.py sweeps them; GQA_TILE_FP8 over a float8 cache),
    and with each tile's slots loaded a tile ahead (GQA_SLOT_PREFETCH): still
    the reference attention, the reduce cutting the keys by the same BLOCK_N."""
    from tidal.kernels import paged_attention as pa

    monkeypatch.setattr(pa, "GQA_TILE_FP8" if cache == "fp8" else "GQA_TILE", tile)
    monkeypatch.setattr(pa, "GQA_SLOT_PREFETCH", prefetch)
    kv_lens = [731, 5, 300, 129]
    gen = torch.Generator().manual_seed(splits)
    seqs = [(1, n, 0) for n in kv_lens]
    k, v, table, rows = _paged_cache(seqs, 2, 64, torch.float32, gen)
    q = torch.randn(len(seqs), 8, 64, generator=gen)
    if cache == "fp8":  # as the engine runs it: bf16 queries over float8 K/V (float16 products, FP8_F16_PRODUCTS)
        k, v = (k * 3).to(torch.float8_e4m3fn), (v * 3).to(torch.float8_e4m3fn)
        q = q.to(torch.bfloat16)
        q[0, 0, 0] = 1e5  # past float16's range: clamped, not inf (its head's softmax is one key either way)
    want = _reference_attention(q, k, v, table, rows, seqs)
    got = pa.decode_attention(
        q.to(DEV), k.to(DEV), v.to(DEV), table.to(DEV), torch.tensor(rows, device=DEV), torch.tensor(kv_lens, dtype=torch.int32, device=DEV), num_splits=splits,
        out=torch.full_like(q, float("nan"), device=DEV),
    )
    assert rel(got.cpu(), want) <= tol(q.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in DECODE_CASES if c[3] is not None and c[3] > 1], ids=lambda c: f"B{len(c[0])}-H{c[1]}/{c[2]}-splits{c[3]}")
def test_decode_attention_fused_reduce_matches_the_second_launch(case, dtype):
    """The reduce done by each sequence's last split program gives the
    two-launch result (same combine, same split order: equal up to how the
    compiler lowers the sum in each kernel, which on an H100 differed in the
    last bit at one Qwen shape) and the same bits on every run (its ticket
    counters are back at zero after each launch)."""
    from tidal.kernels import paged_attention as pa
    from tidal.kernels import scratch_zeros

    kv_lens, heads, heads_kv, splits = case
    gen = torch.Generator().manual_seed(len(kv_lens) * 17 + heads)
    seqs = [(1, n, 0) for n in kv_lens]
    k, v, table, rows = _paged_cache(seqs, heads_kv, 64, dtype, gen)
    q = torch.randn(len(seqs), heads, 64, generator=gen).to(dtype)
    args = (q.to(DEV), k.to(DEV), v.to(DEV), table.to(DEV), torch.tensor(rows, device=DEV), torch.tensor(kv_lens, dtype=torch.int32, device=DEV))
    want = pa.decode_attention(*args, num_splits=splits, fused_reduce=False)
    first = None
    for _ in range(3):
        got = pa.decode_attention(*args, num_splits=splits, out=torch.full_like(want, float("nan")), fused_reduce=True)
        assert rel(got.cpu().float(), want.cpu().float()) <= tol(dtype) / 8
        assert first is None or torch.equal(got, first)
        first = got
        assert int(scratch_zeros("decode attention tickets", 1, torch.int32, want.device).abs().sum()) == 0


EXTEND_CASES = [
    # (q_len, kv_len, bidir) per sequence: a whole image prefix, a prompt after a
    # cached prefix, a chunk inside the prefix's step, decodes mixed in, text only
    [(12, 12, 8)],
    [(70, 70, 50), (3, 60, 50), (1, 9, 0), (66, 100, 0)],
    [(5, 20, 20), (64, 64, 0), (1, 1, 0)],
    [(65, 90, 70), (1, 130, 0), (1, 70, 70), (2, 40, 0)],  # one-query blocks: a prompt's last, decode rows
] + ([[(731, 731, 730), (9, 739, 730), (1, 800, 730), (200, 1200, 730), (130, 130, 0)]] if CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seqs", EXTEND_CASES, ids=lambda s: "-".join(f"{a}/{b}/{c}" for a, b, c in s))
@pytest.mark.parametrize("heads, heads_kv", [(4, 4), (4, 2)])
def test_extend_attention(seqs, heads, heads_kv, dtype):
    from tidal.kernels.extend_attention import (
        EXTEND_BLOCK_M,
        extend_attention,
        extend_blocks,
    )

    gen = torch.Generator().manual_seed(sum(a * b for a, b, _ in seqs))
    dim = 64
    k, v, table, rows = _paged_cache(seqs, heads_kv, dim, dtype, gen)
    total_q = sum(s[0] for s in seqs)
    q = torch.randn(total_q, heads, dim, generator=gen).to(dtype)
    want = _reference_attention(q, k, v, table, rows, seqs)
    blocks = extend_blocks([s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs], rows, EXTEND_BLOCK_M)
    out = torch.full_like(q, float("nan"), device=DEV)
    got = extend_attention(q.to(DEV), k.to(DEV), v.to(DEV), table.to(DEV), torch.tensor(blocks, dtype=torch.int32, device=DEV), out=out)
    assert rel(got.cpu(), want) <= tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads, heads_kv", [(4, 4), (4, 2)])
def test_attention_reads_a_float8_cache(heads, heads_kv, dtype):
    """EngineConfig.kv_dtype="fp8": the decode kernels (one split, several,
    the grouped form) and the extend kernel over a float8 cache give the
    reference's attention over the same stored values (upcast exactly)."""
    from tidal.kernels.extend_attention import (
        EXTEND_BLOCK_M,
        extend_attention,
        extend_blocks,
    )
    from tidal.kernels.paged_attention import decode_attention

    gen = torch.Generator().manual_seed(heads * 7 + heads_kv)
    dim = 64
    for seqs in ([(1, 9, 0), (1, 130, 0), (1, 64, 0)], EXTEND_CASES[3]):
        k, v, table, rows = _paged_cache(seqs, heads_kv, dim, torch.float32, gen)
        k, v = (k * 3).to(torch.float8_e4m3fn), (v * 3).to(torch.float8_e4m3fn)
        q = torch.randn(sum(s[0] for s in seqs), heads, dim, generator=gen).to(dtype)
        want = _reference_attention(q, k, v, table, rows, seqs)
        args = (q.to(DEV), k.to(DEV), v.to(DEV), table.to(DEV))
        if all(s[0] == 1 for s in seqs):
            for splits in (1, 3):
                got = decode_attention(*args, torch.tensor(rows, device=DEV), torch.tensor([s[1] for s in seqs], dtype=torch.int32, device=DEV), num_splits=splits)
                assert rel(got.cpu(), want) <= tol(dtype), splits
        blocks = extend_blocks([s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs], rows, EXTEND_BLOCK_M)
        got = extend_attention(*args, torch.tensor(blocks, dtype=torch.int32, device=DEV))
        assert rel(got.cpu(), want) <= tol(dtype)


@triton.jit
def _store_float8(X, Y, n, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, cache_value(tl.load(X + i, mask=i < n, other=0.0), Y, True), mask=i < n)


def test_cache_value_stores_float8_as_the_torch_path_does():
    """kv_store.cache_value into a float8 cache: the bytes KVPool.stored gives
    (clamped to +-448, nearest, ties to even, signed zeros, subnormals),
    for values across every binade, at the rounding boundaries, and past the
    range (the interpreter's own float8 cast misrounds near powers of two)."""
    from tidal.cache.kv_pool import KVPool

    gen = torch.Generator().manual_seed(8)
    grid = torch.tensor([m * 2.0**e for e in range(-10, 9) for m in (1.0, 1.0625, 1.125, 1.1875, 1.9375, 1.96875, 1.99)])  # ties, near the binade's top
    x = torch.cat([torch.randn(6000, generator=gen) * s for s in (0.003, 1.0, 40.0)] + [grid, -grid, torch.tensor([0.0, -0.0, 447.0, 449.0, 464.0, 1e9, -1e9, float("inf"), -float("inf")])])
    y = torch.empty(len(x), dtype=torch.float8_e4m3fn, device=DEV)
    _store_float8[(1,)](x.to(DEV), y, len(x), triton.next_power_of_2(len(x)))
    want = KVPool(1, 1, 1, 1, torch.float8_e4m3fn, "cpu").stored(x)
    assert torch.equal(y.cpu().view(torch.uint8), want.view(torch.uint8))


def _assert_stored_as_float8(cache: torch.Tensor, want: torch.Tensor) -> None:
    """A float8 cache holds want as KVPool.stored makes it (clamped to +-448,
    rounded to nearest): all but the rare value whose float32 rounding on
    the other path put it across a float8 rounding boundary, and those one
    float8 step away."""
    from tidal.cache.kv_pool import KVPool

    pool = KVPool(1, 1, 1, 1, torch.float8_e4m3fn, "cpu")
    expect = pool.stored(want.float()).float()
    got = cache.cpu().float()
    assert (got == expect).float().mean() >= 0.999
    assert ((got - expect).abs() <= expect.abs() / 8 + 2.0**-9).all()


# -- fused MoE ----------------------------------------------------------------------------------
def _moe_reference(x, weights, ids, fc1, fc2, act="geglu_plus1"):
    """float64, token by token."""
    x, fc1, fc2 = x.double(), fc1.double(), fc2.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].double(), ids[t]):
            h, g = (fc1[e] @ x[t]).chunk(2)
            a = torch.nn.functional.silu(h) * g if act == "swiglu" else torch.nn.functional.gelu(h) * (g + 1)
            out[t] += w * (fc2[e] @ a)
    return out


def test_align_by_expert_groups_pairs_into_one_expert_blocks():
    from tidal.kernels.fused_moe import align_by_expert

    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(9, generator=gen)[:3] for _ in range(11)])  # 11 tokens, top-3 of 9 experts
    pairs, block_expert = align_by_expert(ids, 9, 4)
    flat = ids.reshape(-1)
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        rows = pairs[b * 4 : (b + 1) * 4].tolist()
        real = [r for r in rows if r < flat.numel()]
        if e == 9:
            assert not real  # past the last expert: padding only
        assert all(flat[r] == e for r in real)
        assert real == sorted(real)  # stable: pairs keep token order within an expert
        seen += real
    assert sorted(seen) == list(range(flat.numel()))


@pytest.mark.parametrize("tokens, experts, top_k, block_m", [(1, 128, 8, 16), (3, 64, 8, 16), (17, 8, 2, 16), (40, 16, 4, 4), (64, 128, 8, 64)])
def test_the_block_layout_holds_every_pair_however_they_fall(tokens, experts, top_k, block_m):
    """max_blocks bounds the blocks any routing needs: spread evenly, piled
    on few experts, or each expert one past a block's end."""
    from tidal.kernels.fused_moe import align_by_expert, max_blocks

    gen = torch.Generator().manual_seed(tokens * experts)
    pairs = tokens * top_k
    routings = [torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])]
    routings.append((torch.arange(pairs) % experts).view(tokens, top_k))  # round robin: as many experts as possible
    routings.append((torch.arange(pairs) // (block_m + 1) % experts).view(tokens, top_k))  # runs of block_m + 1
    for ids in routings:
        sorted_pairs, block_expert = align_by_expert(ids, experts, block_m)
        assert block_expert.numel() == max_blocks(pairs, experts, block_m)
        real = sorted_pairs[sorted_pairs < pairs]
        assert sorted(real.tolist()) == list(range(pairs))


MOE_CASES = [(1, 8, 2, 64, 48), (5, 8, 2, 64, 48), (40, 6, 3, 96, 80)] + (
    [(1, 64, 8, 2048, 1024), (8, 64, 8, 2048, 1024), (64, 64, 8, 2048, 1024), (300, 64, 8, 2048, 1024), (1500, 64, 8, 2048, 1024)] if CUDA else []
)


@pytest.mark.parametrize("act", ["geglu_plus1", "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: "T{}-E{}-k{}-D{}-I{}".format(*c))
def test_fused_moe(case, dtype, act):
    from tidal.kernels.fused_moe import fused_experts

    tokens, experts, top_k, dim, inner = case
    gen = torch.Generator().manual_seed(tokens + experts)
    x = torch.randn(tokens, dim, generator=gen).to(dtype)
    fc1 = (torch.randn(experts, 2 * inner, dim, generator=gen) / dim**0.5).to(dtype)
    fc2 = (torch.randn(experts, dim, inner, generator=gen) / inner**0.5).to(dtype)
    logits = torch.randn(tokens, experts, generator=gen)
    top, ids = logits.topk(top_k, dim=-1)
    weights = top.softmax(-1)
    want = _moe_reference(x, weights, ids, fc1, fc2, act)
    got = fused_experts(x.to(DEV), weights.to(DEV), ids.to(DEV), fc1.to(DEV), fc2.to(DEV), act)
    assert got.shape == want.shape
    assert rel(got.cpu(), want) <= (1e-5 if dtype == torch.float32 else 1.5e-2)


def test_the_down_kernel_takes_its_own_blocks():
    """A 9-value config (the up kernel's five, then the down kernel's BLOCK_N,
    BLOCK_K, warps, stages) runs the down kernel with its own blocks: each
    pair's output equals the 5-value config's within float32 rounding and the
    torch reference's sum; fit_stages fits each kernel's stages to its own
    tiles; a config of another length is refused."""
    from tidal.kernels.fused_moe import (
        align_by_expert,
        down_config,
        expert_pairs,
        fit_stages,
    )

    tokens, experts, top_k, dim, inner = 5, 8, 2, 64, 48
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(tokens, dim, generator=gen)
    fc1 = torch.randn(experts, 2 * inner, dim, generator=gen) / dim**0.5
    fc2 = torch.randn(experts, dim, inner, generator=gen) / inner**0.5
    top, ids = torch.randn(tokens, experts, generator=gen).topk(top_k, dim=-1)
    weights = top.softmax(-1)
    shared, own = (16, 32, 32, 4, 2), (16, 32, 32, 4, 2, 16, 16, 2, 3)
    assert down_config(shared) == (32, 32, 4, 2) and down_config(own) == (16, 16, 2, 3)
    pairs, block_expert = align_by_expert(ids.to(DEV), experts, 16)
    args = (x.to(DEV), weights.to(DEV), fc1.to(DEV), fc2.to(DEV), top_k, pairs, block_expert)
    a, b = expert_pairs(*args, shared).cpu(), expert_pairs(*args, own).cpu()
    assert rel(b, a) <= 1e-6 and not torch.equal(b, a)  # the same sums, cut into other K chunks: its own blocks ran
    assert rel(b.view(tokens, top_k, dim).sum(1), _moe_reference(x, weights, ids, fc1, fc2, "geglu_plus1")) <= 1e-5
    # float32 on an H100: the up kernel's 3 stages of 80 KiB shrink to 2; the down kernel's 48 KiB stages keep 4
    assert fit_stages((64, 128, 64, 8, 3, 128, 64, 8, 4), 4, 232448) == (64, 128, 64, 8, 2, 128, 64, 8, 4)
    assert fit_stages((64, 128, 64, 8, 3, 64, 128, 8, 4), 4, 232448)[8] == 3  # 64 KiB a down stage: 3 fit, not 4
    with pytest.raises(ValueError, match="5 or 9"):
        down_config((16, 32, 32, 4))


# -- tau + rotary + KV write -----------------------------------------------------------------------
# up to 64 positions tau's projection runs inside the kernel; past that, as a GEMM
TAU_CASES = [(3, 2, 64, 32), (17, 4, 64, 32), (70, 2, 64, 32)] + ([(1, 32, 64, 32), (64, 32, 64, 32), (256, 32, 64, 32), (1000, 32, 64, 32)] if CUDA else [])


@pytest.mark.parametrize("cache", ["model", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TAU_CASES, ids=lambda c: "T{}-H{}-D{}-R{}".format(*c))
def test_tau_rope_kv(case, dtype, cache):
    from tidal.kernels.tau_rope import tau_rope_kv
    from tidal.layers.rotary import PartialRotary
    from tidal.models.moondream3.text import tau_scales

    tokens, heads, dim, rot = case
    gen = torch.Generator().manual_seed(tokens * heads)
    qkv = torch.randn(tokens, 3 * heads * dim, generator=gen).to(dtype)
    wq, wv = torch.randn(heads, 3 * heads * dim, generator=gen) * 0.05, torch.randn(heads, 3 * heads * dim, generator=gen) * 0.05
    alpha = torch.randn(heads, generator=gen)
    positions = torch.randint(0, 4000, (tokens,), generator=gen)
    slots = torch.randperm(tokens + 9, generator=gen)[:tokens]
    rotary = PartialRotary(rot, 4096, 1.5e6, "cpu")
    # the torch path (tidal.models.moondream3.text.TextAttention)
    tau_q, tau_v = tau_scales(qkv, positions, wq, wv, alpha)
    q, k, v = qkv.view(tokens, 3, heads, dim).unbind(1)
    want_q = rotary((q.float() * tau_q[..., None]).to(dtype), positions)
    want_k = rotary(k, positions)
    want_v = (v.float() * tau_v[..., None]).to(dtype)
    k_cache = torch.full((tokens + 9, heads, dim), float("nan"), dtype=dtype, device=DEV)
    if cache == "fp8":  # (NaN has a float8 e4m3 code: the poison survives)
        k_cache = k_cache.to(torch.float8_e4m3fn)
    v_cache = torch.full_like(k_cache, float("nan"))
    got_q = tau_rope_kv(qkv.to(DEV), torch.cat([wq, wv]).to(DEV), alpha.to(DEV), positions.to(DEV), slots.to(DEV), rotary.cos.to(DEV), rotary.sin.to(DEV), k_cache, v_cache, heads, dim)
    t = tol(dtype) if dtype == torch.float32 else 4e-3
    assert rel(got_q.cpu(), want_q) <= t
    if cache == "fp8":
        _assert_stored_as_float8(k_cache[slots.to(DEV)], want_k)
        _assert_stored_as_float8(v_cache[slots.to(DEV)], want_v)
    else:
        assert rel(k_cache[slots.to(DEV)].cpu(), want_k) <= t
        assert rel(v_cache[slots.to(DEV)].cpu(), want_v) <= t
    untouched = torch.ones(tokens + 9, dtype=torch.bool)
    untouched[slots] = False
    assert k_cache[untouched.to(DEV)].float().isnan().all()  # nothing else written


# (bf16 weights only on a GPU: Triton's CPU interpreter gets bf16 matrix products wrong)
@pytest.mark.parametrize("weights", ["float32"] + (["bfloat16"] if CUDA else []))
@pytest.mark.parametrize("tokens, width, heads", [(70, 384, 2), (33, 200, 3)] + ([(1500, 6144, 32), (4096, 6144, 32)] if CUDA else []))
def test_tau_projection_kernel(tokens, width, heads, weights):
    """The tau projection's kernel, gelu(qkv) @ [wq; wv].T, against float64:
    float32's accuracy with float32 weights (IEEE products) and with bf16
    weights (the features cut into three bf16 parts, each product exact), for
    bf16 and float32 activations, tokens and widths not multiples of a tile.
    The torch form (kernel off) is the reference path's arithmetic."""
    from tidal.kernels.tau_rope import tau_projection

    gen = torch.Generator().manual_seed(tokens + width)
    w32 = torch.randn(2 * heads, width, generator=gen) * 0.05
    if weights == "bfloat16":
        w32 = w32.bfloat16().float()  # a bf16 checkpoint's values, held as float32 too
    w16 = w32.bfloat16() if weights == "bfloat16" else None
    for act in DTYPES:
        qkv = (torch.randn(tokens, width, generator=gen) * 2).to(act)
        want = torch.nn.functional.gelu(qkv.double()) @ w32.double().T
        out = tau_projection(qkv.to(DEV), w32.to(DEV), None if w16 is None else w16.to(DEV), kernel=True)
        assert out.dtype == torch.float32 and out.shape == (tokens, 2 * heads)
        assert rel(out.cpu(), want) <= 1e-6
        torch_form = tau_projection(qkv.to(DEV), w32.to(DEV), kernel=False)
        assert rel(torch_form.cpu(), want) <= 1e-6


def test_three_bf16_parts_hold_a_float32_exactly():
    """The split tau_projection's kernel makes with bf16 weights: hi + mid + lo,
    each the bf16 rounding of what is left, gives back the float32 value
    (24 bits in three 8-bit mantissas), and products of bf16 parts are exact
    in float32, so the sum of the three products is the float32 product
    up to float32 rounding."""
    gen = torch.Generator().manual_seed(3)
    f = torch.nn.functional.gelu(torch.randn(100_000, generator=gen) * 3)
    hi = f.bfloat16()
    rest = f - hi.float()
    mid = rest.bfloat16()
    lo = (rest - mid.float()).bfloat16()
    back = hi.double() + mid.double() + lo.double()
    assert ((back - f.double()).abs() <= f.double().abs() * 2.0**-24).all()
    w = (torch.randn(100_000, generator=gen) * 0.05).bfloat16()
    for part in (hi, mid, lo):
        assert torch.equal((part.float() * w.float()).double(), part.double() * w.double())


# -- MoE routing + alignment in one kernel -----------------------------------------------------
# sizes on both sides of one_launch_fits (64 tokens, fewer with many experts); each case runs every form: one program, the top-k on a grid with the alignment over chunks, or one program an expert
@pytest.mark.parametrize("tokens, experts, top_k, block_m", [(1, 8, 2, 16), (13, 16, 4, 16), (40, 64, 8, 16), (65, 8, 2, 16), (100, 16, 4, 16), (300 if CUDA else 130, 64, 8, 64), (3, 128, 8, 16), (90 if CUDA else 40, 128, 8, 32)] + ([(1, 64, 8, 16), (256, 64, 8, 32), (512, 64, 8, 64), (737, 64, 8, 64), (4096, 64, 8, 64), (9000, 128, 8, 64)] if CUDA else []))
def test_route_and_align(tokens, experts, top_k, block_m, monkeypatch):
    from tidal.kernels import moe_route
    from tidal.kernels.fused_moe import align_by_expert
    from tidal.kernels.moe_route import FORMS, route_and_align
    from tidal.layers.moe import route

    monkeypatch.setattr(moe_route, "EXPERT_ALIGN_CHUNK", 64)  # the expert programs read the pairs in several chunks

    gen = torch.Generator().manual_seed(tokens)
    logits = torch.randn(tokens, experts, generator=gen)  # float32: no ties
    # the torch reference: route() on the same logits (identity router), then align_by_expert
    want_w, want_ids = route(logits, torch.eye(experts), None, top_k)
    want_pairs, want_blocks = align_by_expert(want_ids, experts, block_m)
    for form in (None, *FORMS):  # the default, then each form
        w, ids, pairs, blocks = route_and_align(logits.to(DEV), top_k, block_m, torch.float32, form=form)
        assert torch.equal(ids.cpu(), want_ids)
        assert rel(w.cpu(), want_w) <= 1e-6
        assert torch.equal(pairs.cpu(), want_pairs) and torch.equal(blocks.cpu(), want_blocks)
    w16, ids16, _, _ = route_and_align(logits.to(DEV, torch.bfloat16), top_k, block_m, torch.bfloat16)
    assert w16.dtype == torch.bfloat16 and rel(w16.cpu().float(), want_w) <= 2e-2
    # without renormalization (Qwen3's norm_topk_prob=False): the softmax over all experts at the top k
    want_w, _ = route(logits, torch.eye(experts), None, top_k, renormalize=False)
    w, ids, pairs, blocks = route_and_align(logits.to(DEV), top_k, block_m, torch.float32, renormalize=False)
    assert torch.equal(ids.cpu(), want_ids) and torch.equal(pairs.cpu(), want_pairs)
    assert rel(w.cpu(), want_w) <= 1e-6 and float(w.sum(-1).max()) < 1.0


@pytest.mark.parametrize("tokens, experts, dim, top_k, bias", [(1, 16, 96, 4, True), (5, 64, 300, 8, False), (16, 128, 256, 8, True)] + ([(1, 64, 2048, 8, True), (8, 128, 2048, 8, False)] if CUDA else []))
def test_router_route_and_align_in_one_launch(tokens, experts, dim, top_k, bias):
    """The router's product summed over K-slice programs, then the routing by
    the last of them, equals the router's linear followed by route_and_align
    (float32: same experts, same layout, weights within 1e-5), twice in a row
    (the ticket goes back to zero), with the default slices and warps, with
    4 and 8 warps a program, with one and three programs sharing the slices,
    with or without renormalization."""
    from tidal.kernels.moe_route import route_and_align, router_route_and_align

    gen = torch.Generator().manual_seed(tokens * 7 + dim)
    x = torch.randn(tokens, dim, generator=gen).to(DEV)
    w = torch.randn(experts, dim, generator=gen).to(DEV) / dim**0.5
    b = torch.randn(experts, generator=gen).to(DEV) if bias else None
    for renorm in (True, False):
        want = route_and_align(torch.nn.functional.linear(x, w, b), top_k, 16, torch.float32, renorm)
        # the same slicing twice (the ticket goes back to zero), the defaults, both warp counts, then fewer programs than tiles (several tiles each)
        for block_k, warps, programs in ((64, None, None), (64, None, None), (None, None, None), (None, 4, None), (None, 8, None), (16, None, 1), (16, None, 3)):
            got = router_route_and_align(x, w, b, top_k, 16, renorm, block_k=block_k, num_warps=warps, programs=programs)
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
            assert rel(got[0].cpu(), want[0].cpu()) <= 1e-5


def test_route_and_align_forms_agree_on_a_nan_router_row(monkeypatch):
    """A NaN row of router logits (a broken activation) must not move another
    token's pairs: every form gives the same layout, in which each pair of
    every finite row appears exactly once, in its expert's run."""
    from tidal.kernels import moe_route
    from tidal.kernels.moe_route import FORMS, route_and_align

    monkeypatch.setattr(moe_route, "EXPERT_ALIGN_CHUNK", 64)
    tokens, experts, top_k, block_m = 70, 16, 4, 16
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(3))
    logits[7] = float("nan")
    outs = [route_and_align(logits.to(DEV), top_k, block_m, torch.float32, form=form) for form in FORMS]
    for out in outs[1:]:
        assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(out[1:], outs[0][1:]))
    _, ids, pairs, blocks = (t.cpu() for t in outs[0])
    finite = [t * top_k + j for t in range(tokens) if t != 7 for j in range(top_k)]
    placed = pairs[pairs < tokens * top_k].tolist()
    assert sorted(p for p in placed if p // top_k != 7) == finite  # each once
    expert_of = blocks.repeat_interleave(block_m)[: len(pairs)]
    for i, p in enumerate(pairs.tolist()):
        if p < tokens * top_k and p // top_k != 7:
            assert expert_of[i] == ids.view(-1)[p]  # in its expert's run


def test_route_ties_go_to_the_lower_expert():
    from tidal.kernels.moe_route import route_and_align

    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 0.0, 2.0, -1.0]])
    w, ids, _, _ = route_and_align(logits.to(DEV), 4, 16, torch.float32)
    assert ids.tolist() == [[1, 3, 2, 4]]
    assert w[0, 0] == w[0, 1] and w[0, 2] == w[0, 3]


# -- residual + top-k sum + LayerNorm -------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, dim, k, norm", [(1, 128, 2, True), (7, 96, 1, True), (5, 128, 4, False), (9, 72, 0, True)] + ([(1, 2048, 8, True), (300, 2048, 8, True), (64, 2048, 1, False), (1458, 1152, 0, True)] if CUDA else []))
def test_residual_norm(tokens, dim, k, norm, dtype):
    from tidal.kernels.residual_norm import residual_norm

    gen = torch.Generator().manual_seed(tokens * dim + k)
    x, attn = torch.randn(tokens, dim, generator=gen).to(dtype), torch.randn(tokens, dim, generator=gen).to(dtype)
    parts = torch.randn(tokens, k, dim, generator=gen).to(dtype)
    ln = torch.nn.LayerNorm(dim).to(dtype)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(dim, generator=gen))
        ln.bias.copy_(torch.randn(dim, generator=gen))
    # the torch path: x + attn + mlp in the model dtype, the MoE's sum over k, then LayerNorm
    # (k = 0: no parts, a vision block's residual add)
    want_x = x + attn + parts.sum(dim=1) if k else x + attn
    want_h = ln(want_x)
    ln_dev = ln.to(DEV)
    got_x, got_h = residual_norm(x.to(DEV), attn.to(DEV), parts.to(DEV) if k else None, ln_dev if norm else None)
    t = 1e-6 if dtype == torch.float32 else 8e-3
    assert rel(got_x.cpu(), want_x) <= t
    if norm:
        assert rel(got_h.cpu(), want_h.detach()) <= t
    else:
        assert got_h is None


# -- rotary, halves layout (Qwen3-VL's vision tower) ------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, heads, dim", [(1, 4, 16), (7, 6, 72), (5, 3, 8)] + ([(3000, 32, 72)] if CUDA else []))
def test_rope_halves(tokens, heads, dim, dtype):
    """The one-pass kernel equals tidal.layers.rotary.rotate_halves (float32
    tight, bf16 within tolerance) on a strided view, as the tower hands it q and k."""
    from tidal.kernels.rope import rope_halves
    from tidal.layers.rotary import rotate_halves

    gen = torch.Generator().manual_seed(tokens + heads + dim)
    qkv = torch.randn(tokens, 3, heads, dim, generator=gen).to(dtype)
    x = qkv[:, :2].reshape(tokens, 2 * heads, dim)  # a view: rows 3 * heads * dim apart
    angles = torch.rand(tokens, dim // 2, generator=gen) * 50
    want = rotate_halves(x, angles.cos(), angles.sin())
    got = rope_halves(x.to(DEV), angles.cos().to(DEV), angles.sin().to(DEV))
    assert got.shape == want.shape and got.dtype == dtype
    assert rel(got.cpu(), want) <= tol(dtype)


# -- SwiGLU's silu(gate) * up -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, inner", [(1, 48), (5, 96), (3, 1500)] + ([(1, 12288), (700, 12288)] if CUDA else []))
def test_silu_mul(tokens, inner, dtype):
    """One pass over the fused gate/up output equals torch's silu(gate) * up
    (float32 tight; bf16 rounded as torch rounds, within bf16 tolerance);
    a row that is a view (stride wider than 2I) reads right."""
    from tidal.kernels.silu_mul import silu_mul

    gen = torch.Generator().manual_seed(tokens * 7 + inner)
    wide = (torch.randn(tokens, 2 * inner + 8, generator=gen) * 3).to(dtype)
    x = wide[:, : 2 * inner]
    gate, up = x.float().chunk(2, dim=-1)
    want = (torch.nn.functional.silu(gate).to(dtype).float() * up).to(dtype)
    got = silu_mul(x.to(DEV))
    assert got.shape == (tokens, inner) and got.dtype == dtype
    assert rel(got.cpu(), want) <= tol(dtype)


# -- Qwen: residual add + RMSNorm; q/k RMSNorm + rotary + KV write -----------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, dim, k, add, norm", [(1, 64, 1, True, True), (6, 96, 4, True, True), (5, 64, 2, True, False), (3, 64, 1, False, True)] + ([(1, 2048, 8, True, True), (300, 4096, 1, True, True)] if CUDA else []))
def test_add_rms_norm(tokens, dim, k, add, norm, dtype):
    from tidal.kernels.rms_norm import add_rms_norm
    from tidal.layers.norm import RMSNorm

    gen = torch.Generator().manual_seed(tokens * dim + k)
    x = torch.randn(tokens, dim, generator=gen).to(dtype)
    parts = torch.randn(tokens, k, dim, generator=gen).to(dtype)
    rms = RMSNorm(dim, 1e-6).to(dtype)
    with torch.no_grad():
        rms.weight.copy_(torch.randn(dim, generator=gen))
    # the torch path (tidal.models.qwen3_moe.model): x + mlp(h) with the MoE's sum over k, then the next norm
    want_x = x + parts.sum(dim=1) if add else x
    want_h = rms(want_x).detach()
    got_x, got_h = add_rms_norm(x.to(DEV), parts.to(DEV) if add else None, rms.weight.to(DEV) if norm else None, rms.eps)
    t = 1e-6 if dtype == torch.float32 else 8e-3
    assert rel(got_x.cpu(), want_x) <= t
    if norm:
        assert rel(got_h.cpu(), want_h) <= t
    else:
        assert got_h is None


@pytest.mark.parametrize("cache", ["model", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, heads, kv_heads, dim", [(1, 4, 2, 16), (9, 4, 1, 32), (5, 6, 6, 8)] + ([(1, 32, 4, 128), (64, 32, 8, 128), (700, 32, 4, 128)] if CUDA else []))
def test_qk_norm_rope_kv(tokens, heads, kv_heads, dim, dtype, cache):
    from tidal.kernels.rms_norm import qk_norm_rope_kv
    from tidal.layers.norm import RMSNorm
    from tidal.layers.rotary import rotate_halves

    gen = torch.Generator().manual_seed(tokens * heads + dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    qkv[:, -3:] *= 1000  # v beyond float8's +-448 (clamped there in a float8 cache)
    qkv = qkv.to(dtype)
    q_norm, k_norm = RMSNorm(dim, 1e-6).to(dtype), RMSNorm(dim, 1e-6).to(dtype)
    with torch.no_grad():
        q_norm.weight.copy_(torch.randn(dim, generator=gen))
        k_norm.weight.copy_(torch.randn(dim, generator=gen))
    angles = torch.rand(tokens, dim // 2, generator=gen) * 1000.0
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(tokens + 9, generator=gen)[:tokens]
    # the torch path (tidal.models.qwen3_moe.model.Attention)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    want_q = rotate_halves(q_norm(q.reshape(tokens, heads, dim)), cos, sin).detach()
    want_k = rotate_halves(k_norm(k.reshape(tokens, kv_heads, dim)), cos, sin).detach()
    want_v = v.reshape(tokens, kv_heads, dim)
    k_cache = torch.full((tokens + 9, kv_heads, dim), float("nan"), dtype=dtype, device=DEV)
    if cache == "fp8":
        k_cache = k_cache.to(torch.float8_e4m3fn)
    v_cache = torch.full_like(k_cache, float("nan"))
    got_q = qk_norm_rope_kv(qkv.to(DEV), q_norm.weight.to(DEV), k_norm.weight.to(DEV), 1e-6, cos.to(DEV), sin.to(DEV), slots.to(DEV), k_cache, v_cache, heads)
    t = 1e-5 if dtype == torch.float32 else 4e-3
    assert rel(got_q.cpu(), want_q) <= t
    if cache == "fp8":
        _assert_stored_as_float8(k_cache[slots.to(DEV)], want_k)
        _assert_stored_as_float8(v_cache[slots.to(DEV)], want_v)
        assert float(v_cache[slots.to(DEV)].float().abs().max()) == 448.0
    else:
        assert rel(k_cache[slots.to(DEV)].cpu(), want_k) <= t
        assert torch.equal(v_cache[slots.to(DEV)].cpu(), want_v)
    untouched = torch.ones(tokens + 9, dtype=torch.bool)
    untouched[slots] = False
    assert k_cache[untouched.to(DEV)].float().isnan().all() and v_cache[untouched.to(DEV)].float().isnan().all()  # nothing else written


def test_tuned_moe_configs_apply_to_their_shape_and_card_only(tmp_path, monkeypatch):
    """benchmarks/tune_moe.py's table: a step takes the first entry whose token
    limit it fits under (5 values, or 9 with the down kernel's own), for its
    own (E, D, I, k, dtype, card); anything else the defaults."""
    from tidal.kernels import fused_moe

    shape = (16, 64, 32, 2)
    key = fused_moe.shape_key(*shape, torch.float32, "cpu")
    (tmp_path / "moe_configs.json").write_text(__import__("json").dumps({key: [[4, [16, 32, 64, 4, 2]], [1 << 30, [32, 64, 32, 8, 3, 64, 128, 4, 2]]]}))
    monkeypatch.setattr(fused_moe, "TUNED_FILE", tmp_path / "moe_configs.json")
    fused_moe._tuned.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert fused_moe.moe_config(3, shape, torch.float32, cpu) == (16, 32, 64, 4, 2)
        assert fused_moe.moe_config(5, shape, torch.float32, cpu) == (32, 64, 32, 8, 3, 64, 128, 4, 2)  # the down kernel's own blocks kept
        assert fused_moe.moe_config(5, shape, torch.bfloat16, cpu) == fused_moe.moe_config(5)  # another dtype: defaults
        assert fused_moe.moe_config(3, (16, 64, 32, 4), torch.float32, cpu) == fused_moe.moe_config(3)  # another top-k
    finally:
        fused_moe._tuned.cache_clear()


def test_an_untuned_card_takes_its_architectures_table(tmp_path, monkeypatch):
    """A card with no table of its own (an H200 beside the H100's) takes the
    one moe_configs.json keeps for its architecture ("sm90"); the card's own table
    wins where there is one; with neither, the defaults."""
    from tidal.kernels import fused_moe

    shape = (16, 64, 32, 2)
    own, family = [[1 << 30, [16, 32, 64, 4, 2]]], [[1 << 30, [32, 64, 32, 8, 3]]]
    table = {fused_moe.shape_key(*shape, torch.bfloat16, "sm90"): family}
    path = tmp_path / "moe_configs.json"
    monkeypatch.setattr(fused_moe, "TUNED_FILE", path)
    monkeypatch.setattr(fused_moe, "_device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(fused_moe, "device_family", lambda device: "sm90")
    dev = torch.device("cpu")
    try:
        for tables, want in (({}, fused_moe.moe_config(9)), (table, (32, 64, 32, 8, 3)), ({**table, fused_moe.shape_key(*shape, torch.bfloat16, "NVIDIA H200"): own}, (16, 32, 64, 4, 2))):
            path.write_text(__import__("json").dumps(tables))
            fused_moe._tuned.cache_clear()
            assert fused_moe.moe_config(9, shape, torch.bfloat16, dev) == want
    finally:
        fused_moe._tuned.cache_clear()


def test_the_committed_table_names_each_cards_architecture_too():
    """Every card's table in moe_configs.json has its architecture's twin, so
    untuned cards of that architecture take it (the H100's for "sm90")."""
    import json

    from tidal.kernels import fused_moe

    tables = json.loads(fused_moe.TUNED_FILE.read_text())
    h100 = {k.removesuffix("-NVIDIA H100 80GB HBM3"): v for k, v in tables.items() if k.endswith("-NVIDIA H100 80GB HBM3")}
    assert h100 and all(tables[f"{stem}-sm90"] == v for stem, v in h100.items())


def test_moe_configs_keep_to_the_cards_shared_memory():
    """A float32 step doubles the tiles' bytes: the pipeline depth shrinks until
    the up kernel's tiles fit (H100: 232,448 bytes per block), bf16 keeps its own."""
    from tidal.kernels.fused_moe import fit_stages

    h100 = 232448
    big = (64, 128, 64, 8, 3)  # 80 KiB a stage in float32: 3 stages would ask 240 KiB
    assert fit_stages(big, 4, h100) == (64, 128, 64, 8, 2)
    assert fit_stages(big, 2, h100) == big
    assert fit_stages((128, 256, 128, 8, 4), 4, h100)[4] == 1  # never below one stage
    for _, cfg in __import__("tidal.kernels.fused_moe", fromlist=["MOE_CONFIGS"]).MOE_CONFIGS:
        m, n, k, _, stages = fit_stages(cfg, 4, h100)
        assert stages * (m * k + 2 * n * k) * 4 <= h100


# -- skinny matrix products (decode-sized x @ W.T) ------------------------------------------
SKINNY_CASES = [(1, 40, 24, True), (3, 130, 300, False), (16, 64, 512, True)] + ([(1, 6144, 2048, False), (8, 2048, 4096, True), (16, 51200, 2048, False)] if CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, n, k, with_bias", SKINNY_CASES, ids=lambda c: str(c))
def test_skinny_linear(rows, n, k, with_bias, dtype):
    from tidal.kernels.skinny_gemm import skinny_linear

    gen = torch.Generator().manual_seed(rows * 7 + n)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    got = skinny_linear(x.to(DEV), w.to(DEV), None if b is None else b.to(DEV))
    assert got.shape == (rows, n) and got.dtype == dtype
    assert rel(got.float().cpu(), want) <= tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, n, k, split", [(1, 40, 300, 2), (3, 70, 520, 3), (16, 64, 512, 4)] + ([(1, 2048, 4096, 4), (8, 2048, 2048, 8)] if CUDA else []), ids=lambda c: str(c))
def test_skinny_linear_split_k(rows, n, k, split, dtype):
    """K cut into ranges on a second grid axis, the partials summed by each
    column block's last program in range order: the product within
    tolerance, the same bits run after run (its tickets back at zero). The
    interpreter does not exercise the ticket's ordering (a kernel summing at
    the first arrival passed there): the CUDA cases do."""
    from tidal.kernels import scratch_zeros
    from tidal.kernels.skinny_gemm import skinny_linear

    gen = torch.Generator().manual_seed(rows * 11 + n + split)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    args = (x.to(DEV), w.to(DEV), b.to(DEV))
    first = skinny_linear(*args, config=(16, 64, 4, 2, split))
    assert first.shape == (rows, n) and rel(first.float().cpu(), want) <= tol(dtype)
    for _ in range(2):
        assert torch.equal(skinny_linear(*args, config=(16, 64, 4, 2, split)), first)
    assert int(scratch_zeros("skinny tickets", 1, torch.int32, first.device).abs().sum()) == 0


def _graph_outputs(run, poison) -> list[torch.Tensor]:
    """run() once (compiling), capture it in a CUDA graph, poison what it
    returned, replay: the replay's outputs (a read ahead of its producer
    meets the poison)."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for t in outs:
        poison(t)
    graph.replay()
    torch.cuda.synchronize()
    return [t.clone() for t in outs]


def _poison(t: torch.Tensor) -> None:
    t.fill_(float("nan") if t.is_floating_point() else -1)


def _needs_pdl() -> None:
    from tidal.kernels import pdl

    if not pdl.available(torch.device("cuda")):
        pytest.skip("needs sm_90 and Triton's grid-dependency ops")


@pytest.mark.skipif(not CUDA, reason="programmatic dependent launch needs an sm_90 GPU")
@pytest.mark.parametrize(
    "rows, size, config, bias",
    [(1, 2048, None, False), (8, 2048, None, True), (1, 2048, (16, 256, 4, 3, 4), False),  # K in whole tiles
     (1, 2000, None, True), (1, 2000, (16, 256, 4, 3, 4), True), (3, 1100, (16, 256, 4, 3, 4), False),  # a partial last tile; split ranges partial, empty
     (1, 2040, None, False)],  # a partial last block of rows (prefetched: rows of 16-byte multiples)
    ids=str,
)
def test_skinny_chain_with_pdl_gives_the_same_bits(monkeypatch, rows, size, config, bias):
    """A chain of skinny products, each reading the one before's output,
    captured in a CUDA graph: with PDL's early-weights form (each program's
    first weight tile loaded before it waits for its predecessor; the form is
    taken), and with each program's slice prefetched into L2 (with PDL and
    without), every output equals the chain's without either, bit for bit,
    with each intermediate poisoned (NaN) before the replay, so a read of x
    ahead of its producer shows. K in whole tiles or not; split-K ranges
    partial or empty; with and without bias."""
    from tidal.kernels import l2_prefetch, pdl
    from tidal.kernels.skinny_gemm import skinny_config, skinny_linear, takes_early_form

    _needs_pdl()
    monkeypatch.setattr(pdl, "EARLY_WEIGHTS", True)
    block_n, block_k = (config or skinny_config(size, size))[:2]
    assert takes_early_form(block_n, block_k, 2)
    gen = torch.Generator(device="cuda").manual_seed(rows + size)
    ws = [(torch.randn(size, size, device="cuda", generator=gen) / size**0.5).bfloat16() for _ in range(8)]
    bs = [torch.randn(size, device="cuda", generator=gen).bfloat16() if bias else None for _ in ws]
    x = torch.randn(rows, size, device="cuda", generator=gen).bfloat16()

    def run() -> list[torch.Tensor]:
        ys, y = [], x
        for w, b in zip(ws, bs):
            y = skinny_linear(y, w, b, config=config)
            ys.append(y)
        return ys

    outs = {}
    for on, prefetch in ((False, False), (True, False), (True, True), (False, True)):
        monkeypatch.setattr(pdl, "ENABLED", on)
        monkeypatch.setattr(l2_prefetch, "L2_PREFETCH", prefetch)
        assert pdl.early_weights_on(x.device) == on
        assert l2_prefetch.prefetch_fits(ws[0]) == (prefetch and size * 2 % 16 == 0)
        outs[on, prefetch] = torch.stack(_graph_outputs(run, _poison))
        assert not outs[on, prefetch].isnan().any()
    for form, out in outs.items():
        assert torch.equal(out, outs[False, False]), form


@pytest.mark.skipif(not CUDA, reason="programmatic dependent launch needs an sm_90 GPU")
@pytest.mark.parametrize("programs", [None, 4], ids=lambda p: f"programs={p}")
def test_router_after_a_product_with_pdl_gives_the_same_bits(monkeypatch, programs):
    """Qwen3-30B's router shapes (hidden 2048, 128 experts, top 8) reading a
    skinny product's output, captured in a CUDA graph, every output poisoned
    before the replay: with PDL in the plain form and in the early-weights
    form (the router's weight slice loaded before it waits for its input;
    its programs' partials summed by the last one's ticket) the product, the
    routing weights, ids and the expert layout equal, bit for bit, those
    without PDL; one K slice a program and four programs of several."""
    from tidal.kernels import pdl
    from tidal.kernels.moe_route import router_route_and_align
    from tidal.kernels.skinny_gemm import skinny_linear

    _needs_pdl()
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(1, 2048, device="cuda", generator=gen).bfloat16()
    w_in = (torch.randn(2048, 2048, device="cuda", generator=gen) / 2048**0.5).bfloat16()
    w_router = (torch.randn(128, 2048, device="cuda", generator=gen) / 2048**0.5).bfloat16()

    def run() -> list[torch.Tensor]:
        h = skinny_linear(x, w_in)
        return [h, *router_route_and_align(h, w_router, None, 8, 16, True, programs=programs)]

    outs = {}
    for on, early in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(pdl, "ENABLED", on)
        monkeypatch.setattr(pdl, "EARLY_WEIGHTS", early)
        outs[on, early] = _graph_outputs(run, _poison)
        assert not outs[on, early][1].isnan().any() and int(outs[on, early][2].min()) >= 0
    for form in ((True, False), (True, True)):
        assert all(torch.equal(a, b) for a, b in zip(outs[False, False], outs[form])), form


# -- one token routed inside the experts' up kernel (moe_route.ROUTE_IN_UP) --------------------
@pytest.mark.parametrize(
    "experts, dim, inner, top_k, block_m, bias, renorm, act",
    [(16, 96, 48, 4, 16, True, True, "geglu_plus1"), (64, 256, 64, 8, 16, True, True, "geglu_plus1"), (128, 256, 32, 8, 16, False, True, "swiglu"),
     (32, 128, 32, 8, 4, False, False, "swiglu")]  # blocks of 4 rows: ten blocks, the last two take no pair
    + ([(128, 2048, 768, 8, 16, False, True, "swiglu"), (64, 2048, 1024, 8, 16, True, True, "geglu_plus1")] if CUDA else []),
    ids=str,
)
def test_one_token_routed_in_the_up_kernel_matches_the_fused_router(experts, dim, inner, top_k, block_m, bias, renorm, act):
    """router_for_up's partials routed by the up kernel give what the fused
    router's ticket gives: the same experts, the same expert-sorted layout
    (align_by_expert's: pairs and each block's expert), the routing weights
    and every pair's output within float32 rounding; twice in a row (the
    layout is rewritten, not left from the first call); and a NaN row names
    no expert in either form."""
    from tidal.kernels.fused_moe import align_by_expert, expert_pairs, moe_config
    from tidal.kernels.moe_route import router_for_up, router_route_and_align

    gen = torch.Generator().manual_seed(experts + dim + block_m)
    x = torch.randn(1, dim, generator=gen).to(DEV)
    rw = (torch.randn(experts, dim, generator=gen) / dim**0.5).to(DEV)
    rb = torch.randn(experts, generator=gen).to(DEV) if bias else None
    fc1 = (torch.randn(experts, 2 * inner, dim, generator=gen) / dim**0.5).to(DEV)
    fc2 = (torch.randn(experts, dim, inner, generator=gen) / inner**0.5).to(DEV)
    config = (block_m, *moe_config(1)[1:])
    w0, ids0, pairs0, blocks0 = router_route_and_align(x, rw, rb, top_k, block_m, renorm)
    want = expert_pairs(x, w0, fc1, fc2, top_k, pairs0, blocks0, config, act)
    assert torch.equal(pairs0.cpu(), align_by_expert(ids0.cpu(), experts, block_m)[0]) and int((blocks0 == experts).sum()) == blocks0.numel() - top_k
    for _ in range(2):
        w, ids, pairs, blocks, route = router_for_up(x, rw, rb, top_k, block_m, renorm)
        pairs.fill_(-1)
        blocks.fill_(-1)
        got = expert_pairs(x, w, fc1, fc2, top_k, pairs, blocks, config, act, route)
        assert torch.equal(ids, ids0) and torch.equal(pairs, pairs0) and torch.equal(blocks, blocks0)
        if renorm:  # the same sums in the same order: the same bits (without renormalization the sum over all E follows the tile's layout)
            assert torch.equal(w, w0) and torch.equal(got, want)
        else:
            assert rel(w.cpu(), w0.cpu()) <= 1e-6 and rel(got.cpu(), want.cpu()) <= 1e-6
    x_nan = torch.full_like(x, float("nan"))
    _, ids_a, pairs_a, blocks_a = router_route_and_align(x_nan, rw, rb, top_k, block_m, renorm)
    _, _, pairs_b, blocks_b, route = router_for_up(x_nan, rw, rb, top_k, block_m, renorm)
    expert_pairs(x_nan, route.weights, fc1, fc2, top_k, pairs_b, blocks_b, config, act, route)
    assert torch.equal(pairs_b, pairs_a) and torch.equal(blocks_b, blocks_a) and bool((blocks_b == experts).all())
    assert torch.equal(route.ids, ids_a) and bool((route.ids == experts).all())
    # fewer finite logits than k (a -inf bias on all but two experts): the top k repeats an expert; each
    # pair then has a block of its own, in its expert's order and pair order on a tie, with the same output
    bias = torch.full((experts,), float("-inf"), device=DEV)
    bias[[1, experts - 1]] = 0.0
    w0, ids0, pairs0, blocks0 = router_route_and_align(x, rw, bias, top_k, block_m, True)
    want = expert_pairs(x, w0, fc1, fc2, top_k, pairs0, blocks0, config, act)
    w, ids, pairs, blocks, route = router_for_up(x, rw, bias, top_k, block_m, True)
    got = expert_pairs(x, w, fc1, fc2, top_k, pairs, blocks, config, act, route)
    flat = ids0.view(-1).tolist()
    assert len(set(flat)) < top_k and torch.equal(ids, ids0) and torch.equal(w, w0) and torch.equal(got, want)
    placed = pairs.view(-1, block_m)[:top_k, 0].tolist()  # block b's pair
    assert sorted(placed) == list(range(top_k)) and blocks[:top_k].tolist() == [flat[j] for j in placed]
    assert placed == sorted(range(top_k), key=lambda j: (flat[j], j))  # experts ascending, pair order on a tie


@pytest.mark.skipif(not CUDA, reason="programmatic dependent launch needs an sm_90 GPU")
def test_one_token_routed_in_the_up_kernel_in_a_graph_gives_the_same_bits(monkeypatch):
    """Qwen3-30B's MoE shapes in bf16 after a skinny product, captured in a
    CUDA graph with outputs poisoned before the replay: routed in the up
    kernel (with PDL on and off) every pair's output, weight, id and layout
    entry equals the fused router's, bit for bit."""
    from tidal.kernels import moe_route, pdl
    from tidal.kernels.fused_moe import expert_pairs, moe_config
    from tidal.kernels.skinny_gemm import skinny_linear

    _needs_pdl()
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(1, 2048, device="cuda", generator=gen).bfloat16()
    w_in = (torch.randn(2048, 2048, device="cuda", generator=gen) / 2048**0.5).bfloat16()
    rw = (torch.randn(128, 2048, device="cuda", generator=gen) / 2048**0.5).bfloat16()
    fc1 = (torch.randn(128, 1536, 2048, device="cuda", generator=gen) / 2048**0.5).bfloat16()
    fc2 = (torch.randn(128, 2048, 768, device="cuda", generator=gen) / 768**0.5).bfloat16()
    config = moe_config(1, (128, 2048, 768, 8), torch.bfloat16, x.device)

    def run(in_up: bool) -> list[torch.Tensor]:
        h = skinny_linear(x, w_in)
        if in_up:
            w, ids, pairs, blocks, route = moe_route.router_for_up(h, rw, None, 8, config[0])
        else:
            (w, ids, pairs, blocks), route = moe_route.router_route_and_align(h, rw, None, 8, config[0]), None
        return [expert_pairs(h, w, fc1, fc2, 8, pairs, blocks, config, "swiglu", route), w, ids, pairs, blocks]

    want = _graph_outputs(lambda: run(False), _poison)
    for on in (True, False):
        monkeypatch.setattr(pdl, "ENABLED", on)
        got = _graph_outputs(lambda: run(True), _poison)
        assert not got[0].isnan().any()
        assert all(torch.equal(a, b) for a, b in zip(got, want)), on


@triton.jit
def _spans(Out, rows, row_elems, stride, BLOCK: tl.constexpr, ITEM: tl.constexpr):
    """Each program's row_block_span, as byte offset and byte count."""
    pid = tl.program_id(0)
    first, nbytes = row_block_span(pid, rows, row_elems, stride, BLOCK, ITEM)
    tl.store(Out + 2 * pid, first * ITEM)
    tl.store(Out + 2 * pid + 1, nbytes.to(tl.int64))


def test_the_l2_prefetch_spans_tile_the_weight_exactly():
    """row_block_span (what each skinny program prefetches: its BLOCK_N rows
    of W) gives 16-byte multiples that tile the weight exactly, the last
    block's partial rows included: no byte before the weight or past its
    end, none twice. Sizes: 2040 rows (a partial last block), 2048, 100."""
    for rows, k, block in ((2040, 2040, 16), (2048, 4096, 64), (100, 8, 32)):
        blocks = triton.cdiv(rows, block)
        out = torch.full((blocks, 2), -1, dtype=torch.int64, device=DEV)
        _spans[(blocks,)](out, rows, k, k, BLOCK=block, ITEM=2)
        start, size = out[:, 0].tolist(), out[:, 1].tolist()
        assert start[0] == 0 and all(a + n == b for a, n, b in zip(start, size, start[1:]))  # back to back
        assert start[-1] + size[-1] == rows * k * 2 and all(n > 0 and n % 16 == 0 for n in size)
