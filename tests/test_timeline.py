"""benchmarks/timeline.py: the sweep over a step's kernels that splits its span
into busy, overlapping and idle time (what the profile reports rest on)."""

from __future__ import annotations

import json

import pytest

from benchmarks.timeline import (
    Kernel,
    idle_host_calls,
    stream_kernels,
    timeline,
    timeline_report,
    trace_kernels,
)


def _event(name: str, stream: int, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_trace_kernels_keeps_device_kernels_in_start_order():
    trace = {"traceEvents": [
        _event("b", 7, 20.0, 5.0),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 50.0},
        _event("a", 13, 10.0, 2.5),
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1.0},
    ]}
    kernels = trace_kernels(json.loads(json.dumps(trace)))
    assert kernels == [Kernel("a", 13, 10.0, 12.5), Kernel("b", 7, 20.0, 25.0)]


def test_timeline_splits_the_span_into_busy_overlap_and_idle():
    # stream 1: a [0, 10), c [14, 20); stream 2: b [5, 12), d [25, 30)
    kernels = sorted([Kernel("a", 1, 0, 10), Kernel("b", 2, 5, 12), Kernel("c", 1, 14, 20), Kernel("d", 2, 25, 30)], key=lambda k: k.start_us)
    tl = timeline(kernels)
    assert tl.span_us == pytest.approx(30)
    assert tl.busy_us == pytest.approx(12 + 6 + 5)
    assert tl.overlap_us == pytest.approx(5)
    assert tl.idle_us == pytest.approx(2 + 5)
    assert tl.per_stream_us == {1: pytest.approx(16), 2: pytest.approx(12)}
    assert tl.gaps == [(pytest.approx(5), "c", "d"), (pytest.approx(2), "b", "c")]


def test_back_to_back_kernels_leave_no_gap():
    tl = timeline([Kernel("a", 1, 0, 4), Kernel("b", 1, 4, 9)])
    assert tl.busy_us == pytest.approx(9) and tl.idle_us == pytest.approx(0) and tl.gaps == []


def test_report_divides_by_steps():
    kernels = [Kernel("a", 1, 0, 10), Kernel("b", 1, 20, 30)]
    text = timeline_report(kernels, steps=2)
    assert "span 15.0 us" in text and "a kernel running 10.0 us" in text and "nothing running 5.0 us" in text
    assert "idle   10.0 us between a and b" in text


def test_the_busiest_streams_kernels_are_listed_by_time():
    kernels = [Kernel("gemm", 1, 0, 8), Kernel("norm", 1, 8, 10), Kernel("gemm", 1, 10, 16), Kernel("moe", 2, 0, 5)]
    assert stream_kernels(kernels, 1) == [("gemm", (2, pytest.approx(14))), ("norm", (1, pytest.approx(2)))]
    text = timeline_report(kernels, steps=2)
    assert "on stream 1, per step:" in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("  - ")] == ["gemm", "norm"]
    assert "1 x    7.0 us =     7.0 us" in text  # per step: one gemm of 7 us on average


def _call(name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur}


def test_idle_host_calls_names_what_the_host_did_while_no_kernel_ran():
    # kernels busy [0, 10) and [30, 40) (two streams overlapping in the first), idle [10, 30) and a 1 us gap [40, 41)
    trace = {"traceEvents": [
        _event("a", 1, 0.0, 10.0), _event("b", 2, 2.0, 5.0), _event("c", 1, 30.0, 10.0), _event("d", 1, 41.0, 2.0),
        _call("cudaEventSynchronize", 0.0, 12.0),  # 2 us of the gap
        _call("cudaGraphLaunch", 20.0, 15.0),  # 10 us of the gap
        _call("cudaMemcpyAsync", 40.0, 1.0),  # only in the gap under min_gap_us
        _call("cudaLaunchKernel", 31.0, 2.0),  # while a kernel ran
    ]}
    assert idle_host_calls(trace) == [("cudaGraphLaunch", 10.0, 1), ("cudaEventSynchronize", 2.0, 1)]
    assert ("cudaMemcpyAsync", 1.0, 1) in idle_host_calls(trace, min_gap_us=0.5)
