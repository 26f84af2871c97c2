"""Where a decode step's time goes, kernel by kernel, and how the big kernels
do against their own floors.

    PYTHONPATH=. python3 benchmarks/profile_step.py [--batch 1 32] [--prefill 1 2] [--mixed] [--out DIR]

Random bf16 weights at full size. For each batch size: the graph replay's
time (GPU time of the whole step), then torch.profiler over the same step run
eagerly through the same function (kernel names, counts, CUDA time), then the
fused MoE and decode attention alone against bytes / copy bandwidth, and the
host's phases of whole engine steps (step_phases.py).
--prefill: image prefill steps; --mixed: a step of 48 decoding sequences and
two new images, its wall time against its GPU kernel time (host-bound or not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_moondream import FixedLength, build
from benchmarks.measure import copy_bandwidth, timed
from benchmarks.step_phases import phases_report, step_phases
from benchmarks.timeline import (
    idle_host_calls,
    profiler_kernels,
    profiler_trace,
    timeline_report,
    trace_kernels,
)
from tidal.api import Moondream
from tidal.engine.engine import EngineConfig
from tidal.engine.request import Request
from tidal.models.moondream3.config import MoondreamConfig
from tidal.models.moondream3.tiny import build_tokenizer


def decoding(md: Moondream, batch: int, context: int = 740) -> list[Request]:
    reqs = [Request(skill=FixedLength(10_000), pending=[0] + [(i * 7 + j) % 5000 + 10 for j in range(context - 1)], bidir_len=0) for i in range(batch)]
    for r in reqs:
        md.engine.add_request(r)
    while any(not r.history or r.pending_len > 1 for r in reqs):
        md.engine.step()
    md.engine.step()
    torch.cuda.synchronize()
    return reqs


def kernel_table(prof, top: int = 25) -> str:
    rows = {}
    for evt in prof.key_averages():
        if evt.device_time_total > 0 and evt.device_type.name == "CUDA":
            rows[evt.key] = (evt.count, evt.device_time_total)
    total = sum(t for _, t in rows.values())
    lines = [f"{'kernel':<70} {'count':>6} {'us':>9} {'share':>6}"]
    for name, (count, t) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{name[:70]:<70} {count:>6} {t:>9.1f} {t / total:>6.1%}")
    lines.append(f"{'total':<70} {sum(c for c, _ in rows.values()):>6} {total:>9.1f}")
    return "\n".join(lines)


def microbench(model, bandwidth: float) -> list[str]:
    """The fused MoE of one layer, routing and decode attention, alone, against
    their floors: GPU time per call from graph replays (timing launch by
    launch measured the host: ~35 us a Triton launch). The same weights and KV
    every call: what fits in L2 (batch-1 attention's 6 MB) reads faster than in
    a step; benchmarks/bench_kernels.py rotates copies past L2."""
    from benchmarks.bench_kernels import CALLS, graph_us
    from tidal.kernels.fused_moe import fused_experts
    from tidal.kernels.paged_attention import decode_attention, decode_splits
    from tidal.layers.moe import route

    out = []
    moe = model.text.blocks[-1].mlp
    expert_bytes = (moe.fc1.weight[0].numel() + moe.fc2.weight[0].numel()) * 2
    for tokens in (1, 8, 32, 64, 256):
        x = torch.randn(tokens, model.config.text.dim, device="cuda", dtype=torch.bfloat16)
        w, ids = route(x, moe.router.weight, moe.router.bias, moe.top_k)
        used = int(torch.unique(ids).numel())
        ms = graph_us([lambda: fused_experts(x, w, ids, moe.fc1.weight, moe.fc2.weight)] * CALLS) / 1000
        floor = used * expert_bytes / bandwidth * 1000
        out.append(f"fused MoE, {tokens:>3} tokens ({used:>2} experts): {ms * 1000:7.1f} us, floor {floor * 1000:6.1f} us ({floor / ms:5.1%} of bandwidth)")
    from tidal.kernels.fused_moe import align_by_expert
    from tidal.kernels.moe_route import route_and_align

    for tokens in (64, 737, 1474, 2048, 4096, 8192):
        logits = torch.randn(tokens, moe.router.weight.shape[0], device="cuda", dtype=torch.bfloat16)

        def torch_route():
            top, ids = torch.topk(logits, moe.top_k, dim=-1)
            torch.softmax(top, dim=-1, dtype=torch.float32).to(logits.dtype)
            align_by_expert(ids, logits.shape[1], 64)

        kernel = graph_us([lambda: route_and_align(logits, moe.top_k, 64, logits.dtype)] * CALLS) / 1000
        ref = graph_us([torch_route] * CALLS) / 1000
        out.append(f"routing + alignment, {tokens:>4} tokens: kernels {kernel * 1000:7.1f} us, torch ops {ref * 1000:7.1f} us (GPU time)")
    heads, dim = model.config.text.n_heads, model.config.text.head_dim
    for batch, ctx in ((1, 740), (32, 740), (128, 740)):
        slots = batch * ctx + 1
        k = torch.randn(slots, heads, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        table = torch.arange(1, slots, device="cuda").view(batch, ctx)
        table = torch.nn.functional.pad(table, (0, 4096 - ctx))
        q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
        rows = torch.arange(batch, device="cuda")
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        splits = decode_splits(batch, heads)
        ms = graph_us([lambda: decode_attention(q, k, v, table, rows, lens, splits)] * CALLS) / 1000
        floor = batch * ctx * heads * dim * 2 * 2 / bandwidth * 1000
        out.append(f"decode attention, batch {batch:>3} x {ctx} positions ({splits} splits): {ms * 1000:7.1f} us, floor {floor * 1000:6.1f} us")
    return out


def prefill_report(md: Moondream, n_images: int) -> list[str]:
    """An image prefill step (bos + 729 image positions + a 6-token question) for
    `n_images` requests at once: wall time, then kernel by kernel; and the
    vision encoder for 1 and 9 crops."""
    import numpy as np
    from PIL import Image

    from tidal.core import ImageInput

    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 255, (378, 378, 3), dtype=np.uint8) for _ in range(n_images)]
    embeds = [md.engine.runner.encode_image(p) for p in pixels]

    def step() -> None:
        reqs = [Request(skill=FixedLength(1), pending=[0, ImageInput(e, f"img{i}-{rng.integers(1 << 30)}"), 1, 15381, 2, 54, 60, 3], bidir_len=730) for i, e in enumerate(embeds)]
        for r in reqs:
            md.engine.add_request(r)
        while not all(r.finished for r in reqs):
            md.engine.step()

    ms = statistics.median(timed(step, 5, warmup=2))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    out = [f"\n=== image prefill, {n_images} request(s) x 737 positions: {ms:.2f} ms wall ===", kernel_table(prof)]
    for crops in (1, 9):
        big = np.asarray(Image.fromarray(pixels[0]).resize((378 * 3, 378 * 3) if crops == 9 else (378, 378)))
        enc = statistics.median(timed(lambda: md.engine.runner.encode_image(big), 5, warmup=2))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            md.engine.runner.encode_image(big)
            torch.cuda.synchronize()
        out += [f"\n=== image encode, {big.shape[1]}x{big.shape[0]} px: {enc:.2f} ms wall ===", kernel_table(prof, top=12)]
    return out


def mixed_report(md: Moondream, decode_rows: int = 48, sizes=((1280, 720), (1920, 1080))) -> list[str]:
    """A step as the mixed workload's busy steps are: `decode_rows` sequences
    decoding plus one new image of each size prefilled (encoder, image prefix,
    question). Wall time against the GPU's kernel time in the same step: what
    the host adds (eager launches, per-sequence work) when steps run eagerly."""
    from benchmarks.bench_moondream import image

    reqs = decoding(md, decode_rows)
    seeds = iter(range(7000, 8000))

    def images_step(profiled=None) -> float:
        new = [Request(skill=FixedLength(1), pending=[0, md._image_item(image(w, h, next(seeds))), 1, 15381, 2, 54, 60, 3], bidir_len=730) for w, h in sizes]
        for r in new:
            md.engine.add_request(r)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if profiled is not None:
            with profiled:
                md.engine.step()
                torch.cuda.synchronize()
        else:
            md.engine.step()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1000
        assert len(md.engine.stats.last_chunks) == decode_rows + len(sizes), "the step did not hold every sequence"
        while not all(r.finished for r in new):
            md.engine.step()
        return wall

    images_step()  # compiles and warms
    walls = [images_step() for _ in range(3)]
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    images_step(prof)
    table = kernel_table(prof)
    gpu_ms = float(table.splitlines()[-1].split()[-1]) / 1000
    for r in reqs:
        md.engine.abort(r)
    head = f"\n=== mixed step: {decode_rows} decoding + new images {sizes}: {statistics.median(walls):.1f} ms wall (median of 3), {gpu_ms:.1f} ms of GPU kernels ==="
    return [head, table]


def loop_timeline(engine, steps: int = 16) -> str:
    """The kernels of `steps` engine steps run back to back (with overlap on, each
    queued behind the running one): the idle stretches between their graph
    replays are what the host still adds to a step."""
    engine.step()  # one in flight before the trace, as in a steady stream
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    trace = profiler_trace(prof)
    lines = [timeline_report(trace_kernels(trace), steps=steps)]
    for name, us, gaps in idle_host_calls(trace)[:8]:
        lines.append(f"  host in {name[:40]:<40} while nothing ran: {us / steps:7.1f} us a step ({gaps} gaps)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prefill", type=int, nargs="*", default=[], help="also profile image prefill steps of these many requests")
    ap.add_argument("--mixed", action="store_true", help="also profile a mixed step: 48 decoding sequences and two new images")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-micro", action="store_true", help="skip the kernels-alone figures after the steps")
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    model = build(MoondreamConfig(), torch.bfloat16)
    # overlap off while steps are scheduled by hand below (a step launched ahead holds slots they would not know of)
    md = Moondream(model, build_tokenizer(model.config.text.vocab_size), EngineConfig(prefix_cache=False, max_running=max(*args.batch, 64 if args.mixed else 1), overlap=False))
    graphs = md.engine.runner.graphs
    report = [f"copy bandwidth {bandwidth / 1e12:.2f} TB/s"]
    for batch in args.batch:
        reqs = decoding(md, batch)
        steps = [md.engine._seq_step(c) for c in md.engine.scheduler.schedule()]
        assert len(steps) == batch and graphs.can_run(steps)
        replay = statistics.median(timed(lambda: graphs.run(steps), 20, warmup=3))
        eager = statistics.median(timed(lambda: graphs.run(steps, replay=False), 5, warmup=1))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graphs.run(steps, replay=False)
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as replayed:
            graphs.run(steps)
            torch.cuda.synchronize()
        report += [f"\n=== decode step, batch {batch}: graph replay {replay:.3f} ms, the same step eager {eager:.2f} ms ===", kernel_table(prof), "one graph replay:", timeline_report(profiler_kernels(replayed))]
        report.append(phases_report(step_phases(md.engine), f"Moondream 3 decode, batch {batch}, overlap off"))
        md.engine.config.overlap = True  # the next step queued behind the running one
        report.append(phases_report(step_phases(md.engine), f"Moondream 3 decode, batch {batch}, overlap on"))
        report += ["steps back to back, overlap on:", loop_timeline(md.engine)]
        md.engine.config.overlap = False
        md.engine.step()  # reads the step launched ahead: none is in flight past here
        for r in reqs:
            md.engine.abort(r)
    for n in args.prefill:
        report += prefill_report(md, n)
    if args.mixed:
        report += mixed_report(md)
    if not args.no_micro:
        report += ["", *microbench(model, bandwidth)]
    md.close()
    text = "\n".join(report)
    os.makedirs(args.out, exist_ok=True)  # (a missing folder lost a whole device run's report)
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
