"""Where a graph-replayed decode step's wall time goes on the host: the engine's
scheduling, the request-to-slot table's flush, filling the static inputs, the
graph launch call, and reading the results back (which waits for the GPU),
beside the replay's own GPU time (CUDA events around the launch).

wall - GPU is the time per step the GPU is not running a step's graph: what
queueing the next step behind the running one (EngineConfig.overlap) wins
back where it is on. Steps run back to back, the device synchronized only
around them all. Used by profile_step.py (Moondream 3) and bench_qwen.py --profile.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

# (object path from the engine, method, label), in the order a step runs them
_PHASES = (
    ("scheduler", "schedule", "schedule"),
    ("runner", "launch", "runner.launch (fill + launch)"),
    ("runner", "collect", "runner.collect (wait + read)"),
    ("runner.req_to_token", "flush", "table flush (copy + scatter)"),
    ("runner.graphs", "_fill", "fill host inputs"),
    ("runner.graphs", "_pad", "pad rows"),
    ("runner.graphs", "_launch", "graph launch call"),
)


def _resolve(engine, path: str):
    obj = engine
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@contextmanager
def _timing(engine, acc: dict[str, float], gpu: list[tuple[torch.cuda.Event, torch.cuda.Event]]):
    """Wrap each phase's method (an instance attribute shadowing the class's)
    to add its host seconds to acc; record CUDA events around each launch."""
    patched = []
    for path, name, label in _PHASES:
        obj = _resolve(engine, path)
        fn = getattr(obj, name)

        def timed(*args, _fn=fn, _label=label, **kwargs):
            if _label == "graph launch call":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            out = _fn(*args, **kwargs)
            acc[_label] += time.perf_counter() - t0
            if _label == "graph launch call":
                end.record()
                gpu.append((start, end))
            return out

        setattr(obj, name, timed)
        patched.append((obj, name))
    try:
        yield
    finally:
        for obj, name in patched:
            delattr(obj, name)


def step_phases(engine, steps: int = 30) -> dict[str, float]:
    """Run `steps` engine steps (the caller has every sequence decoding) and
    return microseconds per step: 'wall', 'gpu' (the replays' GPU time), each
    phase's host time, and 'replayed' (the share of steps that replayed)."""
    acc: dict[str, float] = defaultdict(float)
    gpu: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    graphs = engine.runner.graphs
    replays = graphs.replays
    with _timing(engine, acc, gpu):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):  # back to back: with EngineConfig.overlap a step is queued behind the running one
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    out = {"wall": wall / steps * 1e6, "gpu": sum(s.elapsed_time(e) for s, e in gpu) / steps * 1e3}
    out.update({label: acc[label] / steps * 1e6 for _, _, label in _PHASES})
    out["replayed"] = (graphs.replays - replays) / steps
    return out


def phases_report(phases: dict[str, float], label: str) -> str:
    """The phases as lines: wall, GPU, the difference, then each phase."""
    lines = [
        f"host phases, {label} (us a step): wall {phases['wall']:.1f}, graph on the GPU {phases['gpu']:.1f}, "
        f"not running this step's graph {phases['wall'] - phases['gpu']:.1f} ({phases['replayed']:.0%} of steps replayed)"
    ]
    lines += [f"  phase {name:<36} {phases[name]:>8.1f}" for _, _, name in _PHASES]
    return "\n".join(lines)
