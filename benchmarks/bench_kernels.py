"""Decode-sized kernels alone, each variant beside its floor, on the models'
real shapes: what to change next in the batch-1 step.

    PYTHONPATH=. python3 benchmarks/bench_kernels.py [--out DIR] [--rows 1 8]

Every figure is GPU time per call from CUDA events around a replayed CUDA
graph of many calls (as decode steps run them; timing launch by launch would
measure the host). Weights rotate through copies that together exceed the L2
cache, so each call reads its bytes from memory as in a real step. Floors are
bytes read over the device-to-device copy bandwidth measured in the same run.

Parts:
- projections: torch's linear (cuBLAS) against tidal.kernels.skinny_gemm for
  Moondream 3, Qwen3-30B-A3B and Qwen3-VL-8B projection shapes;
- tau + rotary + K/V write at batch 1: the projection's tile and warps;
- decode attention: splits per sequence (Moondream's 32 heads; Qwen's GQA),
  the splits combined by a second launch or by their last program;
- attention-large: the grouped decode kernel at batch 64 / 128 over bf16 and
  float8 caches, slots scattered (splits, then tiles);
- a MoE router's product and routing: two launches, or one (FUSED_ROUTER).
Prints a table; writes DIR/bench-kernels.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import card_facts, copy_bandwidth, write_lines  # noqa: E402

DEV = torch.device("cuda")
L2_BYTES = 50 << 20
CALLS = 20  # calls per graph

# name -> (N, K): y [rows, N] = x [rows, K] @ W.T
PROJECTIONS = {
    "moondream qkv": (6144, 2048),
    "moondream attn out": (2048, 2048),
    "moondream dense fc1": (8192, 2048),
    "moondream dense fc2": (2048, 8192),
    "moondream router": (64, 2048),
    "qwen3-30b qkv": (5120, 2048),
    "qwen3-30b o": (2048, 4096),
    "qwen3-30b router": (128, 2048),
    "qwen3-vl-8b qkv": (6144, 4096),
    "qwen3-vl-8b o": (4096, 4096),
    "qwen3-vl-8b gate_up": (24576, 4096),
    "qwen3-vl-8b down": (4096, 12288),
    "moondream lm_head": (51200, 2048),
    "qwen3-30b lm_head": (151936, 2048),
    "qwen3-vl-8b lm_head": (151936, 4096),
}


# (BLOCK_N, BLOCK_K, warps, stages) tried beside skinny_config's pick
# (BLOCK_N, BLOCK_K, warps, stages[, split-K ranges])
SKINNY_SWEEP = ((16, 512, 4, 3), (32, 256, 4, 4), (16, 128, 4, 6), (32, 128, 8, 5), (64, 128, 8, 4), (16, 256, 4, 4, 2), (16, 256, 4, 3, 4), (32, 128, 4, 4, 4), (16, 128, 4, 4, 8))


def max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over want's largest magnitude (float32)."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def graph_us(calls: list[Callable[[], object]], reps: int = 10) -> float:
    """Median GPU time of one call: all calls captured in one graph, replayed reps times."""
    for fn in calls:
        fn()  # compile and pick library kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)


def copies(make: Callable[[], torch.Tensor], nbytes: int) -> list[torch.Tensor]:
    """Enough copies of a weight that cycling through them misses L2."""
    return [make() for _ in range(max(2, min(CALLS, 2 * L2_BYTES // max(nbytes, 1) + 1)))]


def projections(rows_list: list[int], bandwidth: float, results: dict, lines: list[str]) -> None:
    from tidal.kernels.skinny_gemm import prefers_skinny, skinny_linear

    lines.append("| projection | rows | floor us | cuBLAS us | skinny us | skinny / cuBLAS | auto takes | best skinny config, us |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator(device=DEV).manual_seed(0)
    for name, (n, k) in PROJECTIONS.items():
        ws = copies(lambda: (torch.randn(n, k, device=DEV, generator=gen) / k**0.5).to(torch.bfloat16), n * k * 2)
        for rows in rows_list:
            x = torch.randn(rows, k, device=DEV, generator=gen).to(torch.bfloat16)
            want = torch.nn.functional.linear(x, ws[0]).float()
            got = skinny_linear(x, ws[0]).float()
            err = float((got - want).norm() / want.norm())
            assert err < 1e-2, f"{name}: skinny_linear differs from torch's by {err:.2e}"
            floor = n * k * 2 / bandwidth * 1e6
            cublas = graph_us([lambda w=ws[i % len(ws)]: torch.nn.functional.linear(x, w) for i in range(CALLS)])
            skinny = graph_us([lambda w=ws[i % len(ws)]: skinny_linear(x, w) for i in range(CALLS)])
            # a few other launches: what the default heuristic leaves on the table
            swept = {cfg: graph_us([lambda w=ws[i % len(ws)], cfg=cfg: skinny_linear(x, w, config=cfg) for i in range(CALLS)]) for cfg in SKINNY_SWEEP}
            best = min(swept, key=swept.get)
            auto = "skinny" if prefers_skinny(n, k) else "cuBLAS"
            results[f"proj {name} rows{rows}"] = {"floor_us": floor, "cublas_us": cublas, "skinny_us": skinny, "auto": auto, "swept_us": {str(c): t for c, t in swept.items()}}
            lines.append(f"| {name} ({n}x{k}) | {rows} | {floor:.1f} | {cublas:.1f} | {skinny:.1f} | {skinny / cublas:.2f} | {auto} | {best}: {swept[best]:.1f} |")
        del ws


def tau(bandwidth: float, results: dict, lines: list[str]) -> None:
    """Moondream 3's tau + rotary + K/V write at batch 1 (its projection reads
    two float32 rows of [wq; wv] per head)."""
    from tidal.kernels.tau_rope import tau_rope_kv

    heads, dim, rot = 32, 64, 32
    width = 3 * heads * dim
    gen = torch.Generator(device=DEV).manual_seed(1)
    qkv = torch.randn(1, width, device=DEV, generator=gen).to(torch.bfloat16)
    ws = copies(lambda: torch.randn(2 * heads, width, device=DEV, generator=gen) * 0.05, 2 * heads * width * 4)
    alpha = torch.randn(heads, device=DEV, generator=gen)
    pos = torch.tensor([700], device=DEV)
    loc = torch.tensor([5], device=DEV)
    cos = torch.rand(4096, rot // 2, device=DEV, generator=gen)
    sin = torch.rand(4096, rot // 2, device=DEV, generator=gen)
    kc = torch.zeros(16, heads, dim, device=DEV, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    floor = 2 * heads * width * 4 / bandwidth * 1e6
    lines.append("\n| tau + rotary + K/V, batch 1 | us | floor us |")
    lines.append("| --- | --- | --- |")
    want = tau_rope_kv(qkv, ws[0], alpha, pos, loc, cos, sin, kc, vc, heads, dim)
    for launch in (None, (1024, 4), (2048, 4), (2048, 8), (1024, 8), (512, 4)):
        got = tau_rope_kv(qkv, ws[0], alpha, pos, loc, cos, sin, kc, vc, heads, dim, launch=launch)
        assert torch.equal(got, want) or float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
        us = graph_us([lambda w=ws[i % len(ws)], launch=launch: tau_rope_kv(qkv, w, alpha, pos, loc, cos, sin, kc, vc, heads, dim, launch=launch) for i in range(CALLS)])
        label = "default (4096, 8 warps)" if launch is None else f"BLOCK_C {launch[0]}, {launch[1]} warps"
        results[f"tau {label}"] = us
        lines.append(f"| {label} | {us:.1f} | {floor:.1f} |")


def attention(bandwidth: float, results: dict, lines: list[str]) -> None:
    """Decode attention at several split counts, with the splits combined by
    a second launch and by the last split program (FUSED_REDUCE). Both combine
    in split order, but the compiler may lower the [splits, D] sum differently
    in the two kernels: the table says whether they agreed bit for bit, and
    anything past bf16's resolution fails the run."""
    from tidal.kernels.paged_attention import decode_attention, decode_splits

    lines.append("\n| decode attention | batch | context | splits | two launches us | fused reduce us | fused = two launches | floor us |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator(device=DEV).manual_seed(2)
    for label, heads, kv_heads, dim, ctx in (("moondream", 32, 32, 64, 740), ("qwen3-30b", 32, 4, 128, 600), ("qwen3-vl-8b", 32, 8, 128, 1000)):
        for batch in (1, 8, 32, 64):
            slots = batch * ctx + 1
            n_copies = max(2, min(CALLS, 2 * L2_BYTES // (2 * slots * kv_heads * dim * 2) + 1))
            caches = [(torch.randn(slots, kv_heads, dim, device=DEV, generator=gen).to(torch.bfloat16), torch.randn(slots, kv_heads, dim, device=DEV, generator=gen).to(torch.bfloat16)) for _ in range(n_copies)]
            table = torch.nn.functional.pad(torch.arange(1, slots, device=DEV).view(batch, ctx), (0, 4096 - ctx))
            rows = torch.arange(batch, device=DEV)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
            q = torch.randn(batch, heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
            floor = batch * ctx * kv_heads * dim * 2 * 2 / bandwidth * 1e6
            default = decode_splits(batch, kv_heads, heads // kv_heads)
            for splits in sorted({default, 1, 4, 8, 16} if batch < 32 else {default, 1, 2, 4}):
                timed, same = {}, "-"
                for fused in (False, True):
                    if fused and splits == 1:
                        continue  # one split writes its output directly: nothing to fuse
                    want = decode_attention(q, caches[0][0], caches[0][1], table, rows, lens, splits, fused_reduce=False)
                    got = decode_attention(q, caches[0][0], caches[0][1], table, rows, lens, splits, fused_reduce=fused)
                    if fused:
                        diff = max_rel_diff(got, want)
                        assert diff < 1e-2, f"{label} b{batch} splits {splits}: the fused reduce is off by {diff:.2e}"
                        same = "bit for bit" if torch.equal(got, want) else f"no, {diff:.1e} max rel"
                        results[f"attention {label} b{batch} splits{splits} fused max rel diff"] = diff
                    timed[fused] = graph_us([lambda kv=caches[i % n_copies], s=splits, f=fused: decode_attention(q, kv[0], kv[1], table, rows, lens, s, fused_reduce=f) for i in range(CALLS)])
                    results[f"attention {label} b{batch} splits{splits}{' fused' if fused else ''}"] = timed[fused]
                mark = " (default)" if splits == default else ""
                fused_us = f"{timed[True]:.1f}" if True in timed else "-"
                lines.append(f"| {label} ({heads}/{kv_heads} heads) | {batch} | {ctx} | {splits}{mark} | {timed[False]:.1f} | {fused_us} | {same} | {floor:.1f} |")
            if kv_heads < heads:
                gqa_tiles(label, batch, (q, caches, table, rows, lens), default, floor, results, lines)
            del caches


# (BLOCK_N, warps, stages[, "prefetch"]). On sm_90 Triton buffers the K/V
# tiles (loaded through the slot table) once up to 4 stages and twice from 5;
# with the slots loaded a tile ahead (GQA_SLOT_PREFETCH) twice at 3, three
# times at 4.
GQA_TILES = (
    (64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 3), (32, 4, 4), (64, 4, 4), (128, 4, 2), (64, 4, 5), (32, 4, 6), (128, 8, 5), (64, 8, 6),
    (64, 4, 3, "prefetch"), (64, 4, 4, "prefetch"), (32, 4, 4, "prefetch"), (128, 4, 3, "prefetch"),
)


def gqa_tiles(label: str, batch: int, inputs: tuple, splits: int, floor: float, results: dict, lines: list[str], tiles: tuple = GQA_TILES) -> None:
    """The grouped decode kernel at `splits` with other (BLOCK_N, warps,
    stages) tiles (paged_attention.GQA_TILE, or GQA_TILE_FP8 over a float8
    cache), each checked against the default tile's output first (bf16
    resolution)."""
    from tidal.kernels import paged_attention as pa
    from tidal.kernels.kv_store import is_fp8

    q, caches, table, rows, lens = inputs
    knob = "GQA_TILE_FP8" if is_fp8(caches[0][0]) else "GQA_TILE"
    default_tile, default_prefetch = getattr(pa, knob), pa.GQA_SLOT_PREFETCH
    want = pa.decode_attention(q, caches[0][0], caches[0][1], table, rows, lens, splits)
    cells = []
    try:
        for tile in tiles:
            setattr(pa, knob, tile[:3])
            pa.GQA_SLOT_PREFETCH = tile[3:] == ("prefetch",)
            got = pa.decode_attention(q, caches[0][0], caches[0][1], table, rows, lens, splits)
            diff = max_rel_diff(got, want)
            assert diff < 1e-2, f"{label} b{batch} tile {tile}: off by {diff:.2e}"
            us = graph_us([lambda kv=caches[i % len(caches)]: pa.decode_attention(q, kv[0], kv[1], table, rows, lens, splits) for i in range(CALLS)])
            results[f"attention {label} b{batch} splits{splits} tile{tile}"] = us
            cells.append(f"{tile}: {us:.1f}")
    finally:
        setattr(pa, knob, default_tile)
        pa.GQA_SLOT_PREFETCH = default_prefetch
    lines.append(f"| {label} {knob} (BLOCK_N, warps, stages) | {batch} | | {splits} | {'; '.join(cells)} | | | {floor:.1f} |")


def bf16_products(name: str, batch: int, inputs: tuple, splits: int, want: torch.Tensor, results: dict, lines: list[str]) -> None:
    """A float8 cache's grouped decode with bf16 product operands
    (kv_store.FP8_F16_PRODUCTS off: each value converted twice)
    against the default float16 ones, same splits and tile."""
    from tidal.kernels import kv_store
    from tidal.kernels import paged_attention as pa

    q, caches, table, rows, lens = inputs
    timed, default = {}, kv_store.FP8_F16_PRODUCTS
    for f16 in (True, False):
        kv_store.FP8_F16_PRODUCTS = f16
        try:
            got = pa.decode_attention(q, caches[0][0], caches[0][1], table, rows, lens, splits)
            diff = max_rel_diff(got, want)
            assert diff < 1e-2, f"{name} b{batch} f16 products {f16}: off by {diff:.2e}"
            timed[f16] = graph_us([lambda kv=caches[i % len(caches)]: pa.decode_attention(q, kv[0], kv[1], table, rows, lens, splits) for i in range(CALLS)])
        finally:
            kv_store.FP8_F16_PRODUCTS = default
        results[f"attention large {name} b{batch} splits{splits} f16 products {f16}"] = timed[f16]
    lines.append(f"| {name}, products f16 / bf16 (default {'f16' if default else 'bf16'}) | {batch} | | {splits}: {timed[True]:.1f} / {timed[False]:.1f} | | | | |")


def attention_large(bandwidth: float, results: dict, lines: list[str]) -> None:
    """Grouped decode attention at the batches of the concurrency targets
    (Qwen3-VL-8B's 128 image chats at ~1000 positions, Qwen3-30B's 64
    requests), over the exact bf16 cache and the float8 one
    (EngineConfig.kv_dtype="fp8"): splits, then tiles. A float8 step's floor
    is half the bytes; the 128-chat run shows the kernel well short of it."""
    from tidal.kernels.paged_attention import decode_attention, decode_splits

    lines.append("\n| decode attention, large batch | batch | context | splits | us | | | floor us |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator(device=DEV).manual_seed(3)
    for label, heads, kv_heads, dim, ctx, batch in (("qwen3-vl-8b", 32, 8, 128, 1000, 128), ("qwen3-vl-8b", 32, 8, 128, 1000, 64), ("qwen3-30b", 32, 4, 128, 700, 64)):
        for dtype in (torch.bfloat16, torch.float8_e4m3fn):
            name = f"{label} {'fp8' if dtype != torch.bfloat16 else 'bf16'}"
            slots = batch * ctx + 1
            item = torch.empty((), dtype=dtype).element_size()
            n_copies = max(2, min(4, 2 * L2_BYTES // (2 * slots * kv_heads * dim * item) + 1))
            caches = [tuple(torch.randn(slots, kv_heads, dim, device=DEV, generator=gen).to(dtype) for _ in range(2)) for _ in range(n_copies)]
            table = torch.nn.functional.pad(torch.randperm(slots - 1, device=DEV, generator=gen).add(1).view(batch, ctx), (0, 4096 - ctx))  # int64, as the engine's
            rows = torch.arange(batch, device=DEV)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
            q = torch.randn(batch, heads, dim, device=DEV, generator=gen).to(torch.bfloat16)
            floor = batch * ctx * kv_heads * dim * 2 * item / bandwidth * 1e6
            default = decode_splits(batch, kv_heads, heads // kv_heads)
            want = decode_attention(q, caches[0][0], caches[0][1], table, rows, lens, default)
            cells = []
            for splits in sorted({default, 1, 2, 4}):
                got = decode_attention(q, caches[0][0], caches[0][1], table, rows, lens, splits)
                diff = max_rel_diff(got, want)
                assert diff < 1e-2, f"{name} b{batch} splits {splits}: off by {diff:.2e}"
                us = graph_us([lambda kv=caches[i % n_copies], s=splits: decode_attention(q, kv[0], kv[1], table, rows, lens, s) for i in range(CALLS)])
                results[f"attention large {name} b{batch} splits{splits}"] = us
                cells.append(f"{splits}{' (default)' if splits == default else ''}: {us:.1f}")
            lines.append(f"| {name} ({heads}/{kv_heads} heads), splits | {batch} | {ctx} | {'; '.join(cells)} | | | | {floor:.1f} |")
            if dtype != torch.bfloat16:
                bf16_products(name, batch, (q, caches, table, rows, lens), default, want, results, lines)
            gqa_tiles(name, batch, (q, caches, table, rows, lens), default, floor, results, lines)
            del caches


def router(bandwidth: float, results: dict, lines: list[str]) -> None:
    """A MoE layer's router product and routing at decode sizes: the router's
    linear (as EngineConfig(skinny_gemm="auto") runs it) then the routing
    launch, against both in one launch (moe_route.FUSED_ROUTER) at a few K
    slices a program; the same experts and layout are checked first."""
    from tidal.kernels.moe_route import route_and_align, router_route_and_align
    from tidal.layers.linear import linear, use_skinny

    use_skinny("auto")
    lines.append("\n| router + routing | tokens | floor us | two launches us | one launch us (K per program; warps and the partials' sum at the default K) |")
    lines.append("| --- | --- | --- | --- | --- |")
    gen = torch.Generator(device=DEV).manual_seed(3)
    for label, experts, dim, top_k, bias in (("moondream", 64, 2048, 8, True), ("qwen3-30b", 128, 2048, 8, False)):
        ws = copies(lambda: (torch.randn(experts, dim, device=DEV, generator=gen) / dim**0.5).to(torch.bfloat16), experts * dim * 2)
        b = torch.randn(experts, device=DEV, generator=gen).to(torch.bfloat16) if bias else None
        for tokens in (1, 8):
            x = torch.randn(tokens, dim, device=DEV, generator=gen).to(torch.bfloat16)
            want = route_and_align(linear(x, ws[0], b), top_k, 16, torch.bfloat16)
            got = router_route_and_align(x, ws[0], b, top_k, 16)
            same = torch.equal(got[1], want[1])
            two = graph_us([lambda w=ws[i % len(ws)]: route_and_align(linear(x, w, b), top_k, 16, torch.bfloat16) for i in range(CALLS)])
            one = {bk: graph_us([lambda w=ws[i % len(ws)], bk=bk: router_route_and_align(x, w, b, top_k, 16, block_k=bk) for i in range(CALLS)]) for bk in (32, 64, 128, 256)}
            for warps in (2, 4, 8):  # at the default K slice (the K sweep runs at moe_route.ROUTER_WARPS); a layout unlike the default launch's is marked
                equal = all(torch.equal(a, c) for a, c in zip(router_route_and_align(x, ws[0], b, top_k, 16, num_warps=warps), got))
                one[f"{warps} warps{'' if equal else ', differs'}"] = graph_us([lambda w=ws[i % len(ws)], nw=warps: router_route_and_align(x, w, b, top_k, 16, num_warps=nw) for i in range(CALLS)])
            floor = experts * dim * 2 / bandwidth * 1e6
            results[f"router {label} t{tokens}"] = {"floor_us": floor, "two_launches_us": two, "one_launch_us": one, "same_experts": same}
            cells = ", ".join(f"{us:.1f} ({bk})" for bk, us in one.items())
            lines.append(f"| {label} (E {experts}, D {dim}) | {tokens} | {floor:.1f} | {two:.1f} | {cells}{'' if same else ' (experts differ: bf16 ties)'} |")
        del ws
    use_skinny("off")


def routing(results: dict, lines: list[str]) -> None:
    """The routing and alignment alone (router logits given) at decode and
    small-prefill batch sizes, in each of moe_route.FORMS (one program for
    everything; the top-k grid plus the alignment over chunks or with one
    program an expert); the same layout is checked first. Block size as the
    fused MoE runs at that many tokens."""
    from tidal.kernels import moe_route
    from tidal.kernels.fused_moe import moe_config

    forms = moe_route.FORMS
    lines.append("\n| routing + alignment | tokens | " + " | ".join(f"{f} us" for f in forms) + " | default |")
    lines.append("| --- | --- |" + " --- |" * len(forms) + " --- |")
    gen = torch.Generator(device=DEV).manual_seed(4)
    for label, shape in (("moondream", (64, 2048, 1024, 8)), ("qwen3-30b", (128, 2048, 768, 8))):
        experts, top_k = shape[0], shape[3]
        for tokens in (16, 32, 64, 128, 256, 1024):
            block_m = moe_config(tokens, shape, torch.bfloat16, DEV)[0]
            logits = [torch.randn(tokens, experts, device=DEV, generator=gen).to(torch.bfloat16) for _ in range(CALLS)]
            outs = [moe_route.route_and_align(logits[0], top_k, block_m, torch.bfloat16, form=f) for f in forms]
            assert all(torch.equal(a, b) for out in outs[1:] for a, b in zip(out, outs[0])), f"{label} at {tokens} tokens: the forms differ"
            us = {f: graph_us([lambda x=x, f=f: moe_route.route_and_align(x, top_k, block_m, torch.bfloat16, form=f) for x in logits]) for f in forms}
            default = moe_route.default_form(tokens, experts, top_k)
            results[f"routing {label} t{tokens}"] = {"us": us, "block_m": block_m, "default": default}
            lines.append(f"| {label} (E {experts}, k {top_k}, BM {block_m}) | {tokens} | " + " | ".join(f"{us[f]:.1f}" for f in forms) + f" | {default} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    sections = ("projections", "tau", "attention", "attention-large", "router", "routing")
    ap.add_argument("--only", default=",".join(sections), help=f"comma-separated sections of {', '.join(sections)}")
    args = ap.parse_args()
    only = args.only.split(",")
    if unknown := set(only) - set(sections):
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(sections)}")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    bandwidth = copy_bandwidth()
    results = card_facts(bandwidth)
    lines: list[str] = []
    if "projections" in only:
        projections(args.rows, bandwidth, results, lines)
    if "tau" in only:
        tau(bandwidth, results, lines)
    if "attention" in only:
        attention(bandwidth, results, lines)
    if "attention-large" in only:
        attention_large(bandwidth, results, lines)
    if "router" in only:
        router(bandwidth, results, lines)
    if "routing" in only:
        routing(results, lines)
    write_lines(results, lines, args.out, "bench-kernels.json")


if __name__ == "__main__":
    main()
