"""The issues' targets beside a benchmark run's results: each figure with its
floor (bytes over the copy bandwidth measured in the same run), the peer run
in the same call (the authors' reference, transformers) and its ratio to it,
the target, and whether the run met it. bench_moondream.py and bench_qwen.py
write this table as markdown beside their JSON (card, commit and date at the
top), for docs/PERFORMANCE.md; `targets.py FILE.json MODEL` prints it for a
results file written before."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One figure of an issue's targets.

    key: the result's name in the benchmark's JSON; at_most: a latency (lower
    is better) against a rate; floor: the name of a floor in ms a step (for a
    rate, per_step turns it into the same unit: sequences a step); reference:
    the peer's figure in the same unit; speedup: the issue's least ratio to it."""

    figure: str
    key: str
    unit: str
    bound: float
    at_most: bool
    floor: str | None = None
    per_step: int | None = None
    reference: str | None = None
    speedup: float | None = None


MOONDREAM = [
    Target("decode, batch 1", "fast_decode_b1_ms", "ms", 1.6, True, "floor_decode_b1_ms", reference="ref_compiled_decode_b1_ms", speedup=3.0),
    Target("decode, batch 256", "fast_decode_b256_tok_s", "tok/s", 8000, False, "floor_decode_b256_ms", per_step=256),
    Target("first output, 378 px, new image", "fast_ttft_378_cold_ms", "ms", 20, True, reference="ref_compiled_ttft_378_ms"),
    Target("first output, 1920x1080, new image", "fast_ttft_1080p_cold_ms", "ms", 45, True, reference="ref_compiled_ttft_1080p_ms"),
    Target("first output, 378 px, cached image", "fast_ttft_378_cached_ms", "ms", 8, True),
    Target("first output, 1920x1080, cached image", "fast_ttft_1080p_cached_ms", "ms", 8, True),
    Target("detect 10 objects", "fast_detect_10_ms", "ms", 50, True),
    Target("mixed workload, 64 clients, engine", "fast_mixed_engine_c64_req_s", "req/s", 60, False),
    Target("mixed workload, 64 clients, HTTP", "fast_mixed_http_c64_req_s", "req/s", 60, False),
    Target("warm-up", "fast_warmup_s", "s", 60, True),
]

QWEN3_MOE = [
    Target("decode, batch 1", "tidal_decode_b1_ms", "ms", 2.6, True, "floor_decode_b1_ms", reference="hf_decode_b1_ms"),
    Target("64 concurrent requests, output", "tidal_concurrent64_out_tok_s", "tok/s", 2500, False),
]

QWEN3_VL = [
    Target("decode, batch 1", "tidal_decode_b1_ms", "ms", 6.5, True, "floor_decode_b1_ms", reference="hf_decode_b1_ms"),
    Target("128 concurrent image chats, output", "tidal_concurrent128_out_tok_s", "tok/s", 4500, False),
]


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _get(results: dict, key: str | None) -> float | None:
    """The result, None where it is missing or not a number (no floor on a CPU)."""
    v = results.get(key) if key else None
    return None if v is None or v != v else v


def _floor(t: Target, results: dict) -> float | None:
    ms = _get(results, t.floor)
    if ms is None:
        return None
    return ms if t.per_step is None else t.per_step * 1000 / ms


def _ratio(t: Target, value: float, ref: float) -> float:
    """How many times the peer's figure tidal's is (faster: above 1)."""
    num, den = (ref, value) if t.at_most else (value, ref)
    return num / den if den > 0 else float("inf")


def verdict(t: Target, results: dict) -> str:
    """MET / MISS for the bound and, where the issue asks for one, the ratio
    to the reference (a MISS by the ratio alone says so); "not run" without
    the figure; where the ratio is asked for and the peer did not run, the
    bound's verdict and that the ratio is not known."""
    value = _get(results, t.key)
    if value is None:
        return "not run"
    met = value <= t.bound if t.at_most else value >= t.bound
    if t.speedup is None:
        return "MET" if met else "MISS"
    ref = _get(results, t.reference)
    if ref is None:
        return f"{'MET' if met else 'MISS'} the bound; the {t.speedup:g}x not measured (no peer)"
    if _ratio(t, value, ref) >= t.speedup:
        return "MET" if met else "MISS"
    return f"MISS (the {t.speedup:g}x)" if met else "MISS"


def target_table(results: dict, targets: list[Target]) -> str:
    """Markdown: the run's card, commit, date and copy bandwidth, then a row a target."""
    head = f"{results.get('gpu', '?')}, torch {results.get('torch', '?')}, commit {results.get('commit', '?')}, {results.get('date', '?')}"
    for key in ("shapes", "run"):
        if key in results:
            head += f", {key}: {results[key]}"
    if "memory_cap_gb" in results:
        head += f", device memory capped at {results['memory_cap_gb']} GB"
    if results.get("kv_dtype", "auto") != "auto":
        head += f", KV cache in {results['kv_dtype']} (a numerics option: not the exact cache)"
    if _get(results, "copy_bandwidth_tb_s") is not None:
        head += f", copy bandwidth {results['copy_bandwidth_tb_s']:.2f} TB/s"
    lines = [head, "", "| figure | tidal | floor (of a rate: its ceiling) | peer (same run) | ratio to peer | target | |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for t in targets:
        value = _get(results, t.key)
        floor = _floor(t, results)
        ref = _get(results, t.reference)
        ratio = "" if value is None or ref is None else f"{_ratio(t, value, ref):.2f}x" + (f" (target {t.speedup:g}x)" if t.speedup else "")
        cells = [
            t.figure,
            "-" if value is None else f"{_num(value)} {t.unit}",
            "" if floor is None else f"{_num(floor)} {t.unit}",
            "" if ref is None else f"{_num(ref)} {t.unit}",
            ratio,
            f"{'<=' if t.at_most else '>='} {_num(t.bound)} {t.unit}",
            verdict(t, results),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_targets(results: dict, targets: list[Target], out: str, name: str) -> str:
    """Write the table to out/name (markdown) and return it."""
    table = target_table(results, targets)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        f.write(table)
    return table


TABLES = {"moondream": MOONDREAM, "qwen3-moe": QWEN3_MOE, "qwen3-vl": QWEN3_VL}


def main() -> None:
    """The table of a results file written before: targets.py FILE.json MODEL."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("results", help="a benchmark's JSON")
    ap.add_argument("model", choices=sorted(TABLES))
    args = ap.parse_args()
    with open(args.results) as f:
        print(target_table(json.load(f), TABLES[args.model]), end="")


if __name__ == "__main__":
    main()
