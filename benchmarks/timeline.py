"""What a profiled step's kernels did over time, not only how long each took:
per stream, the kernels' summed time; over the whole span, the time some
kernel ran, the time two or more ran at once (the parallel branches' overlap)
and the idle time no kernel ran (launch gaps a graph replay still has).

Reads torch.profiler's Chrome trace (kernels replayed from a CUDA graph appear
there one by one, each with its stream), so it needs no CUDA itself and is
tested on a hand-made trace on the CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Kernel:
    name: str
    stream: int
    start_us: float
    end_us: float


def trace_kernels(trace: dict) -> list[Kernel]:
    """The device kernels of a Chrome trace (torch.profiler's export), by start time."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            stream = int(e.get("args", {}).get("stream", e.get("tid", 0)))
            out.append(Kernel(e["name"], stream, float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    return sorted(out, key=lambda k: k.start_us)


def profiler_trace(prof) -> dict:
    """A finished torch.profiler.profile's Chrome trace, as a dict."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)


def profiler_kernels(prof) -> list[Kernel]:
    """The kernels a finished torch.profiler.profile recorded."""
    return trace_kernels(profiler_trace(prof))


def idle_host_calls(trace: dict, min_gap_us: float = 2.0) -> list[tuple[str, float, int]]:
    """What the host was in while no kernel ran: for each CUDA runtime call
    (cudaGraphLaunch, cudaMemcpyAsync, cudaEventSynchronize, ...), the idle
    time of gaps of at least `min_gap_us` it overlapped, and in how many gaps.
    A graph launch inside a gap means the device waited for the host to launch.
    -> (name, us, gaps), most time first."""
    tl_gaps = [(a, b) for a, b in timeline(trace_kernels(trace)).idle_stretches if b - a >= min_gap_us]
    calls = [(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"]
    by_name: dict[str, tuple[float, int]] = {}
    for g0, g1 in tl_gaps:
        for name, c0, c1 in calls:
            us = min(g1, c1) - max(g0, c0)
            if us > 0:
                t, n = by_name.get(name, (0.0, 0))
                by_name[name] = (t + us, n + 1)
    return sorted(((name, t, n) for name, (t, n) in by_name.items()), key=lambda x: -x[1])


@dataclass(frozen=True)
class Timeline:
    span_us: float  # first kernel's start to last kernel's end
    busy_us: float  # some kernel running
    overlap_us: float  # two or more running at once
    per_stream_us: dict[int, float]  # summed kernel time per stream
    gaps: list[tuple[float, str, str]]  # idle stretches: (us, kernel before, kernel after), longest first
    idle_stretches: list[tuple[float, float]]  # the same stretches as (start, end), in time order

    @property
    def idle_us(self) -> float:
        return self.span_us - self.busy_us


def timeline(kernels: list[Kernel]) -> Timeline:
    """Sweep the kernels' start and end points: how many run at each moment."""
    if not kernels:
        return Timeline(0.0, 0.0, 0.0, {}, [], [])
    points = sorted([(k.start_us, 1, i) for i, k in enumerate(kernels)] + [(k.end_us, -1, i) for i, k in enumerate(kernels)], key=lambda p: (p[0], p[1]))
    busy = overlap = 0.0
    gaps: list[tuple[float, str, str]] = []
    stretches: list[tuple[float, float]] = []
    running, last_t, last_ended = 0, points[0][0], ""
    for t, delta, i in points:
        if running >= 1:
            busy += t - last_t
        if running >= 2:
            overlap += t - last_t
        if running == 0 and delta == 1 and t > last_t and last_ended:
            gaps.append((t - last_t, last_ended, kernels[i].name))
            stretches.append((last_t, t))
        running += delta
        if delta == -1:
            last_ended = kernels[i].name
        last_t = t
    per_stream: dict[int, float] = {}
    for k in kernels:
        per_stream[k.stream] = per_stream.get(k.stream, 0.0) + k.end_us - k.start_us
    span = max(k.end_us for k in kernels) - kernels[0].start_us
    return Timeline(span, busy, overlap, per_stream, sorted(gaps, key=lambda g: -g[0]), stretches)


def timeline_report(kernels: list[Kernel], steps: int = 1, top_gaps: int = 6, top_kernels: int = 10) -> str:
    """Per-step figures of `timeline(kernels)` (the trace holds `steps` steps) as text."""
    tl = timeline(kernels)
    n = max(steps, 1)
    lines = [
        f"timeline, per step: span {tl.span_us / n:.1f} us, a kernel running {tl.busy_us / n:.1f} us, "
        f"two or more at once {tl.overlap_us / n:.1f} us, nothing running {tl.idle_us / n:.1f} us "
        f"({sum(1 for g in tl.gaps if g[0] >= 1.0) / n:.0f} gaps of 1 us or more)",
        "  kernel time per stream: " + ", ".join(f"stream {s} {t / n:.1f} us ({sum(1 for k in kernels if k.stream == s) / n:.0f} kernels)" for s, t in sorted(tl.per_stream_us.items())),
    ]
    for us, before, after in tl.gaps[:top_gaps]:
        lines.append(f"  idle {us:6.1f} us between {before[:50]} and {after[:50]}")
    if tl.per_stream_us:  # the busiest stream's kernels as they ran (overlapped), not as they run alone
        busiest = max(tl.per_stream_us, key=tl.per_stream_us.get)
        lines.append(f"  on stream {busiest}, per step:")
        for name, (count, us) in stream_kernels(kernels, busiest)[:top_kernels]:
            lines.append(f"  - {name[:60]:<60} {count / n:5.0f} x {us / count:6.1f} us = {us / n:7.1f} us")
    return "\n".join(lines)


def stream_kernels(kernels: list[Kernel], stream: int) -> list[tuple[str, tuple[int, float]]]:
    """One stream's kernels by name: (name, (count, summed us)), most time first."""
    by_name: dict[str, tuple[int, float]] = {}
    for k in kernels:
        if k.stream == stream:
            count, us = by_name.get(k.name, (0, 0.0))
            by_name[k.name] = (count + 1, us + k.end_us - k.start_us)
    return sorted(by_name.items(), key=lambda kv: -kv[1][1])
