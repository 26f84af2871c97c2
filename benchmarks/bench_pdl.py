"""Does programmatic dependent launch (PDL) pay at decode sizes? The question
asked before tidal's kernels took it on (tidal.kernels.pdl), and the
early-weights form's evidence.

    PYTHONPATH=. python3 benchmarks/bench_pdl.py [--out DIR]

A decode step at batch 1 is a chain of ~550 (Qwen3-30B-A3B) or ~400
(Moondream 3) dependent kernels replayed from a CUDA graph, most of them a
few microseconds long, and the profiles put each well above its bytes. With
PDL (sm_90+), a kernel launched with the attribute may have its programs
placed while its predecessor still runs; they wait at `gdc_wait` for the
predecessor's writes. What is independent of the predecessor (here: the
first weight tile) can be loaded before the wait.

The chain here: CALLS matrix-vector products y = W x in a row, each reading
the previous one's y and its own weight (at 8 MiB, together larger than L2),
replayed from one CUDA graph, in three forms:
- plain: no PDL;
- pdl: launched with PDL; each program waits (gdc_wait) before reading x,
  then lets the next kernel launch (gdc_launch_dependents);
- pdl+early: lets the next kernel launch at once, loads its first weight
  tile, then waits (the next kernel's programs may be placed while this one
  streams its weights);
- pdl+early+l2 and plain+l2: as pdl+early and plain, each program first asking
  the copy engine for its whole weight slice in L2 (tidal.kernels.l2_prefetch).
Every form does the same sums in the same order: the chain's outputs must be
bit-equal to plain's, with every intermediate poisoned (NaN) before the
checked replay, so a read that ran ahead of its producer shows.
Prints us per kernel beside the bytes' floor; writes DIR/bench-pdl.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import card_facts, copy_bandwidth, write_lines  # noqa: E402

from tidal.kernels.l2_prefetch import l2_prefetch  # noqa: E402
from tidal.kernels.pdl import HAS_GDC, gdc_launch_dependents, gdc_wait  # noqa: E402

CALLS = 48  # kernels in the chain (Qwen3-30B-A3B has 48 layers)
# name -> (PDL, EARLY, L2 prefetch)
FORMS = {"plain": (False, False, False), "pdl": (True, False, False), "pdl+early": (True, True, False), "pdl+early+l2": (True, True, True), "plain+l2": (False, False, True)}
# (N = K, BLOCK_N): an 8 MiB weight (a projection's size: the chain's 384 MiB miss L2), and a
# 0.5 MiB one (a router's: the chain's 24 MiB stay in L2, so it measures latency and has no floor)
SIZES = ((2048, 16), (512, 4))
L2_BYTES = 50 << 20
BLOCK_K = 256


@triton.jit
def _matvec_kernel(X, W, Y, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr, PREFETCH: tl.constexpr):
    """y[n] = sum_k W[n, k] x[k] over a BLOCK_N slice of rows; float32 sums
    in BLOCK_K chunks, the same order in every form."""
    if PREFETCH:  # the program's rows, contiguous
        l2_prefetch(W + tl.program_id(0) * BLOCK_N * stride_w, BLOCK_N * K * 2)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    if EARLY:
        gdc_launch_dependents()  # the next kernel's programs may be placed now; they wait for our writes
        w0 = tl.load(W + n[:, None] * stride_w + k[None, :])  # independent of the previous kernel
    if PDL:
        gdc_wait()  # the previous kernel's writes (our x) are visible past this
    if not EARLY:
        if PDL:
            gdc_launch_dependents()
        w0 = tl.load(W + n[:, None] * stride_w + k[None, :])
    acc = tl.sum(w0.to(tl.float32) * tl.load(X + k).to(tl.float32)[None, :], axis=1)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = tl.load(W + n[:, None] * stride_w + (k0 + k)[None, :])
        acc += tl.sum(w.to(tl.float32) * tl.load(X + k0 + k).to(tl.float32)[None, :], axis=1)
    tl.store(Y + n, acc.to(Y.dtype.element_ty))


def chain(xs: list[torch.Tensor], ws: list[torch.Tensor], block_n: int, pdl: bool, early: bool, prefetch: bool = False) -> None:
    """xs[i + 1] = ws[i] @ xs[i] for each weight, one launch each."""
    n, k = ws[0].shape
    for i, w in enumerate(ws):
        _matvec_kernel[(n // block_n,)](
            xs[i], w, xs[i + 1], k, w.stride(0),
            BLOCK_N=block_n, BLOCK_K=BLOCK_K, PDL=pdl, EARLY=early, PREFETCH=prefetch, num_warps=4, launch_pdl=pdl,
        )


def run_size(n: int, block_n: int, bandwidth: float, results: dict, lines: list[str]) -> None:
    gen = torch.Generator(device="cuda").manual_seed(n)
    ws = [(torch.randn(n, n, device="cuda", generator=gen) / n**0.5).bfloat16() for _ in range(CALLS)]
    in_l2 = CALLS * n * n * 2 < L2_BYTES
    floor_us = n * n * 2 / bandwidth * 1e6
    outs = {}
    for name, (pdl, early, prefetch) in FORMS.items():
        xs = [torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).bfloat16()]
        xs += [torch.empty(n, device="cuda", dtype=torch.bfloat16) for _ in range(CALLS)]
        chain(xs, ws, block_n, pdl, early, prefetch)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(xs, ws, block_n, pdl, early, prefetch)
        for x in xs[1:]:
            x.fill_(float("nan"))  # poisoned: a read ahead of its producer shows
        graph.replay()
        torch.cuda.synchronize()
        outs[name] = torch.stack(xs[1:]).clone()
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000 / CALLS)
        us = statistics.median(times)
        # the checked replay's outputs equal plain's, and the timed replays left the same
        same = bool(torch.equal(outs[name], outs["plain"])) and not bool(outs[name].isnan().any()) and torch.equal(torch.stack(xs[1:]), outs[name])
        results[f"n{n}_{name}_us"], results[f"n{n}_{name}_bit_equal"] = us, same
        floor = "(in L2) | " if in_l2 else f"{floor_us:.2f} | {us / floor_us:.2f}x"
        lines.append(f"| {n}x{n} bf16 ({n * n * 2 / 2**20:.1f} MiB) | {name} | {us:.2f} | {floor} | {'yes' if same else 'NO'} |")
    if not in_l2:
        results[f"n{n}_floor_us"] = floor_us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0) or not HAS_GDC:
        raise SystemExit("this benchmark needs an sm_90+ CUDA device and Triton's gdc ops")
    bandwidth = copy_bandwidth()
    results = {**card_facts(bandwidth), "calls": CALLS}
    lines = ["| weight | form | us a kernel | floor us | ratio | bits equal plain's, poisoned |", "| --- | --- | --- | --- | --- | --- |"]
    for n, block_n in SIZES:
        run_size(n, block_n, bandwidth, results, lines)
    write_lines(results, lines, args.out, "bench-pdl.json", f", a chain of {CALLS} in one graph")


if __name__ == "__main__":
    main()
