"""Tune the fused MoE kernels' block sizes for one card, per model shape and
step size, and write the table tidal reads (tidal/kernels/moe_configs.json).

    PYTHONPATH=. python3 benchmarks/tune_moe.py --out DIR [--shapes moondream3 qwen3-30b-a3b] [--quick]

For each shape (experts, hidden, expert inner size, top-k) and each step size
(tokens), every candidate (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) runs both
expert GEMMs (up with the activation, down with the routing weight) on random
bf16 weights and a random uniform top-k routing; a candidate counts only if
its output equals the default config's within 1e-2 relative (bf16). Each
kernel is timed on its own (CUDA events around replays of a CUDA graph of eight
calls over four copies of the weights, as decode steps run them, never from
L2; median of --reps): the down kernel (N =
hidden, K = inner) may keep other blocks than the up kernel, under the same
BLOCK_M (a 9-value config, see tidal.kernels.fused_moe). Prints a table
(default vs tuned µs, and the share of copy bandwidth the expert weights read
reach); writes DIR/moe_configs.json (merge it into tidal/kernels/moe_configs.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import graph_us  # noqa: E402
from measure import copy_bandwidth  # noqa: E402

from tidal.kernels.fused_moe import (  # noqa: E402
    MOE_CONFIGS,
    TUNED_FILE,
    MoeConfig,
    align_by_expert,
    device_family,
    expert_pairs,
    experts_down,
    experts_up,
    shape_key,
)

# experts, hidden, inner, top-k, activation
SHAPES = {
    "moondream3": (64, 2048, 1024, 8, "geglu_plus1"),
    "qwen3-30b-a3b": (128, 2048, 768, 8, "swiglu"),
}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # ascending: a table row is an upper bound


def candidates(tokens: int, top_k: int, experts: int, quick: bool) -> list[tuple[int, int, int, int, int]]:
    """Block shapes worth trying at this step size: BLOCK_M near the pairs an expert gets."""
    per_expert = tokens * top_k / experts
    block_m = [m for m in (16, 32, 64, 128) if m <= max(16, 4 * per_expert)]
    grid = itertools.product(block_m, (32, 64, 128), (64, 128, 256), (4, 8), (2, 3, 4))
    out = [c for c in grid if not (c[0] >= 64 and c[1] >= 128 and c[2] >= 256)]  # too much shared memory
    if quick:  # 8 warps only where the tiles are large enough to feed them (prefill sizes)
        out = [c for c in out if (c[3] == 4 or (tokens >= 512 and c[0] >= 64)) and c[4] in (3, 4) and c[2] != 256]
    return out


def default_config(tokens: int) -> MoeConfig:
    return next((cfg for limit, cfg in MOE_CONFIGS if tokens <= limit), MOE_CONFIGS[-1][1])


# Copies of each shape's expert weights the timed calls cycle through: one kernel
# alone at batch 1 reads 24-64 MiB, under the H100's 50 MiB L2, so calls on one
# copy would time cached weights. With four, 72+ MiB pass between two reads of a copy.
COPIES = 4


def time_us(make, reps: int, inner: int = 8) -> float:
    """GPU time of one call: `inner` calls captured in a CUDA graph (as decode
    steps run them), the i-th made by make(i % COPIES) on that weight copy,
    median over reps replays. Timing launches one by one would measure the
    host at small step sizes (~35 us a Triton launch)."""
    return graph_us([make(i % COPIES) for i in range(inner)], reps)


def tune_shape(name: str, tokens_list: tuple[int, ...], reps: int, quick: bool, bandwidth: float, deadline: float, save) -> list[tuple[int, MoeConfig]]:
    """Per step size: each candidate's up and down kernels timed on their own;
    the fastest up and the fastest down of each BLOCK_M (the layout both
    read), then the BLOCK_M whose pair is fastest; kept where the pair, timed
    together, beats the default config."""
    experts, dim, inner, top_k, act = SHAPES[name]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    fc1 = (torch.randn(experts, 2 * inner, dim, device=dev, generator=gen) / dim**0.5).to(torch.bfloat16)
    fc2 = (torch.randn(experts, dim, inner, device=dev, generator=gen) / inner**0.5).to(torch.bfloat16)
    fc1s, fc2s = [fc1] + [fc1.clone() for _ in range(COPIES - 1)], [fc2] + [fc2.clone() for _ in range(COPIES - 1)]
    table = []
    print(f"\n{name}: E={experts} D={dim} I={inner} k={top_k} ({act})")
    print("| tokens | default µs | tuned µs | up (BM, BN, BK, warps, stages) µs | down (BN, BK, warps, stages) µs | expert bytes / bandwidth µs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tokens in tokens_list:
        if time.monotonic() > deadline:
            print(f"  time budget spent: step sizes from {tokens} keep the defaults", file=sys.stderr)
            break
        x = torch.randn(tokens, dim, device=dev, generator=gen).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(experts, device=dev, generator=gen)[:top_k] for _ in range(tokens)])
        weights = torch.softmax(torch.randn(tokens, top_k, device=dev, generator=gen), -1).to(torch.bfloat16)
        used = int(torch.unique(ids).numel())
        floor_us = used * 3 * dim * inner * 2 / bandwidth * 1e6
        layouts = {m: align_by_expert(ids, experts, m) for m in (16, 32, 64, 128)}

        def run(cfg, c: int = 0):
            return lambda: expert_pairs(x, weights, fc1s[c], fc2s[c], top_k, *layouts[cfg[0]], cfg, act)

        def close(got: torch.Tensor) -> bool:
            return float((got.float() - want).norm() / want.norm()) <= 1e-2

        base_cfg = default_config(tokens)
        want = run(base_cfg)().float()
        base_us = time_us(lambda c: run(base_cfg, c), reps)
        ups: dict[int, tuple[float, MoeConfig]] = {}  # BLOCK_M -> the fastest up kernel's (us, config)
        downs: dict[int, tuple[float, MoeConfig]] = {}
        for cfg in candidates(tokens, top_k, experts, quick):
            pairs, blocks = layouts[cfg[0]]
            try:
                hidden = experts_up(x, fc1, top_k, pairs, blocks, cfg, act)
                got = experts_down(hidden, weights, fc2, pairs, blocks, cfg)
            except Exception as exc:  # a config this card cannot run (shared memory, registers)
                print(f"  skipped {cfg}: {type(exc).__name__}", file=sys.stderr)
                continue
            if not close(got):
                print(f"  refused {cfg}: output differs from the default's", file=sys.stderr)
                continue
            up_us = time_us(lambda c: lambda: experts_up(x, fc1s[c], top_k, pairs, blocks, cfg, act), reps)
            down_us = time_us(lambda c: lambda: experts_down(hidden, weights, fc2s[c], pairs, blocks, cfg), reps)
            m = cfg[0]
            if m not in ups or up_us < ups[m][0]:
                ups[m] = (up_us, cfg)
            if m not in downs or down_us < downs[m][0]:
                downs[m] = (down_us, cfg)
        best, best_us, parts = base_cfg, base_us, ""
        if ups:
            m = min(ups, key=lambda m: ups[m][0] + downs[m][0])
            (up_us, up_cfg), (down_us, down_cfg) = ups[m], downs[m]
            cfg = up_cfg if down_cfg[1:5] == up_cfg[1:5] else up_cfg + down_cfg[1:5]  # five values where one config serves both
            together = time_us(lambda c: run(cfg, c), reps)
            parts = f"| {up_cfg} {up_us:.1f} | {down_cfg[1:5]} {down_us:.1f} "
            if together < base_us and close(run(cfg)()):
                best, best_us = cfg, together
        table.append((tokens, best))
        print(f"| {tokens} | {base_us:.1f} | {best_us:.1f} {'(default)' if best == base_cfg else ''} {parts or '| | '}| {floor_us:.1f} |", flush=True)
        save(with_defaults(table))
    return with_defaults(table)


def with_defaults(tuned: list[tuple[int, MoeConfig]]) -> list[tuple[int, MoeConfig]]:
    """The table tidal reads: a step takes the config tuned at the smallest tuned
    size it fits under; past the largest tuned size, the defaults' rows (so a
    run cut short by its time budget still leaves a whole table)."""
    last = tuned[-1][0] if tuned else 0
    return tuned + [(limit, cfg) for limit, cfg in MOE_CONFIGS if limit > last]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="stop starting new step sizes after this long (split evenly over the shapes)")
    ap.add_argument("--quick", action="store_true", help="fewer candidates (3-4 stages, BLOCK_K <= 128; 8 warps only from 512 tokens)")
    ap.add_argument("--merge", action="store_true", help="keep the committed table's rows for the step sizes not tuned in this run")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tuning needs a CUDA device")
    bandwidth = copy_bandwidth()
    card = torch.cuda.get_device_name()
    out: dict[str, list] = {}
    path = os.path.join(args.out, "moe_configs.json")

    committed = json.loads(TUNED_FILE.read_text()) if args.merge and TUNED_FILE.is_file() else {}

    family = device_family(torch.device("cuda"))

    def save_as(key: str, family_key: str):
        def save(table) -> None:  # after every step size: a run cut short keeps what it tuned
            tuned = {limit for limit in args.tokens}
            kept = [row for row in committed.get(key, []) if row[0] not in tuned]
            out[key] = sorted(kept + [row for row in table if row[0] in tuned], key=lambda row: row[0]) if kept else table
            out[family_key] = out[key]  # what untuned cards of this architecture take
            with open(path, "w") as f:
                json.dump(out, f, indent=1)
        return save

    deadline = time.monotonic() + args.budget_s / len(args.shapes)
    for name in args.shapes:
        experts, dim, inner, top_k, _ = SHAPES[name]
        key = shape_key(experts, dim, inner, top_k, torch.bfloat16, card)
        family_key = shape_key(experts, dim, inner, top_k, torch.bfloat16, family)
        tune_shape(name, tuple(args.tokens), args.reps, args.quick, bandwidth, deadline, save_as(key, family_key))
        deadline += args.budget_s / len(args.shapes)
    print(f"\nwrote {path} ({card}, copy bandwidth {bandwidth / 1e12:.2f} TB/s)")


if __name__ == "__main__":
    main()
