"""The host's share of an engine step: what the engine's Python does around
the forward (scheduling, building the step, reading results back), with the
forward itself stubbed out, at a few batch sizes of decoding sequences.
Runs anywhere (the tiny Qwen3-VL model on the CPU by default); on a GPU the
same work happens between graph replays, so it adds to every step's wall time.

    PYTHONPATH=. python3 benchmarks/host_step.py [--batches 1 32 128] [--steps 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_qwen  # noqa: E402

from tidal import LLM  # noqa: E402
from tidal.engine.engine import EngineConfig  # noqa: E402


def host_ms(batch: int, steps: int, context: int) -> float:
    """ms of engine host work per decode step of `batch` sequences; the
    forward replaced by the step's first real results, replayed."""
    model = bench_qwen.build_vl(bench_qwen.VL_TEXT_TINY, bench_qwen.VL_VISION_TINY, torch.float32)
    llm = LLM(model, None, (), EngineConfig(max_running=batch, kv_pages=batch * (context + steps + 64) + 4096, cuda_graphs=False))
    try:
        reqs = [bench_qwen.new_request(llm, bench_qwen.text_prompt(i, context), llm.model.max_context - context - 1) for i in range(batch)]
        for r in reqs:
            llm.engine.add_request(r)
        while any(not r.history or r.pending_len > 1 for r in reqs):
            llm.engine.step()
        runner = llm.engine.runner
        forward = runner.run
        first: list = []

        def stub(seq_steps, **kw):
            if not first:
                first.append(forward(seq_steps, **kw))
            return first[0]

        runner.run = stub
        llm.engine.step()  # the real forward, once
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.engine.step()
        return (time.perf_counter() - t0) / steps * 1000
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--context", type=int, default=64, help="prompt positions of each sequence")
    args = ap.parse_args()
    print("| decoding sequences | engine host work per step, ms |\n| --- | --- |")
    for batch in args.batches:
        print(f"| {batch} | {host_ms(batch, args.steps, args.context):.3f} |", flush=True)


if __name__ == "__main__":
    main()
