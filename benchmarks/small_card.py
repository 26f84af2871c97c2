"""The full model in bf16 on a card of N GB (this process's memory capped):
load, capture graphs, answer every skill, report the KV pool it got.

    PYTHONPATH=. python3 benchmarks/small_card.py --memory-gb 24
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench_moondream import build, image
from tidal.api import Moondream
from tidal.engine.engine import EngineConfig
from tidal.models.moondream3.config import MoondreamConfig
from tidal.models.moondream3.tiny import build_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-gb", type=float, default=24.0)
    ap.add_argument("--max-running", type=int, default=16)
    args = ap.parse_args()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(args.memory_gb * 2**30 / total)
    t0 = time.perf_counter()
    model = build(MoondreamConfig(), torch.bfloat16)
    md = Moondream(model, build_tokenizer(model.config.text.vocab_size), EngineConfig(max_running=args.max_running))
    print(f"loaded and captured in {time.perf_counter() - t0:.1f} s; KV pool {md.engine.allocator.capacity} pages "
          f"({md.engine.kv_pool.k.numel() * 4 / 2**30:.2f} GiB); weights {sum(p.numel() for p in model.parameters()) * 2 / 2**30:.1f} GiB")
    img = image(1280, 720, 1)
    greedy = {"temperature": 0, "max_tokens": 16}
    out = [md.caption(img, "short", settings=greedy), md.query(img, "what is it", reasoning=True, settings=greedy), md.detect(img, "car", {"max_objects": 4}), md.point(img, "car", {"max_objects": 4})]
    handles = [md.submit_query(image(640, 480, 10 + i), "describe", settings=greedy) for i in range(args.max_running)]
    for h in handles:
        h.wait()
    print("every skill answered; peak memory", round(torch.cuda.max_memory_allocated() / 2**30, 2), "GiB of", args.memory_gb, "| sample:", str(out[0])[:80])
    md.close()


if __name__ == "__main__":
    main()
