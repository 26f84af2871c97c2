"""Where one engine step spends its time and where it waits on the device.

    PYTHONPATH=. python3 benchmarks/profile_step.py [--batch 1 32] [--sync-trace]

Random bf16 weights at full size. Prints the top CUDA and CPU ops of one
decode step per batch size (torch.profiler), and with --sync-trace the stack
of every synchronizing call in a sampled (temperature > 0) decode step.
"""

from __future__ import annotations

import argparse
import traceback

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_moondream import FixedLength, build
from tidal.api import Moondream
from tidal.core import OutputSpec
from tidal.engine.engine import EngineConfig
from tidal.engine.request import Request
from tidal.models.moondream3.config import MoondreamConfig
from tidal.models.moondream3.tiny import build_tokenizer


class Sampled(FixedLength):
    def next_output(self) -> OutputSpec:
        return OutputSpec(temperature=0.7, top_p=0.9, seed=1, step=self.steps)


def decoding(md: Moondream, batch: int, skill=FixedLength) -> list[Request]:
    reqs = [Request(skill=skill(10_000), pending=[0] + list(range(10, 110)), bidir_len=0) for _ in range(batch)]
    for r in reqs:
        md.engine.add_request(r)
    while any(not r.history or r.pending_len > 1 for r in reqs):
        md.engine.step()
    for _ in range(3):
        md.engine.step()
    torch.cuda.synchronize()
    return reqs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--sync-trace", action="store_true")
    args = ap.parse_args()
    model = build(MoondreamConfig(), torch.bfloat16)
    md = Moondream(model, build_tokenizer(model.config.text.vocab_size), EngineConfig(prefix_cache=False))
    for batch in args.batch:
        reqs = decoding(md, batch)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            md.engine.step()
            torch.cuda.synchronize()
        print(f"\n=== decode step, batch {batch} ===")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=50))
        for r in reqs:
            md.engine.abort(r)
    if args.sync_trace:
        reqs = decoding(md, 3, Sampled)
        torch.cuda.set_sync_debug_mode("error")
        while True:
            try:
                md.engine.step()
                break
            except RuntimeError as exc:
                if "synchronizing" not in str(exc):
                    raise
                print("\n--- synchronizing call ---")
                traceback.print_exc(limit=-6)
                break
        torch.cuda.set_sync_debug_mode("default")
    md.close()


if __name__ == "__main__":
    main()
