"""Timing and reporting shared by the benchmarks: a device sync around
wall-clock timings, the device's copy bandwidth (every floor's ceiling), an
engine's memory handed back between parts, and the results written as JSON and
printed as a table (or, for the kernel benchmarks, beside their own table's lines)."""

from __future__ import annotations

import json
import os
import statistics
import time
from datetime import datetime, timezone

import torch

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def back_to_back_ms(engine, batch: int, tokens: int, group: int = 8) -> float:
    """ms per decode step, from `tokens` steps run back to back in groups of
    `group` (the device synchronized only around each group: with
    EngineConfig.overlap a step is queued behind the running one, which a
    sync after every step would undo), the median group's mean. Each step
    is checked to hold the whole batch."""
    groups = []
    for _ in range(max(1, tokens // group)):
        sync()
        t = time.perf_counter()
        for _ in range(group):
            engine.step()
            assert len(engine.stats.last_chunks) == batch, "a measured step did not hold the whole batch"
        sync()
        groups.append((time.perf_counter() - t) * 1000 / group)
    return statistics.median(groups)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the memory ceiling)."""
    if DEV.type != "cuda":
        return float("nan")
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = statistics.median(timed(lambda: b.copy_(a), 10, warmup=3))
    return 2 * (1 << 30) / (ms / 1000)


def close_model(md) -> None:
    """Stop the engine; with the caller's reference dropped (md = close_model(md)), its
    KV pool and graphs go back before the next part."""
    import gc

    engine = md.engine
    md.close()
    # the KV pool and graphs go even if something still holds the engine
    engine.kv_pool.k = engine.kv_pool.v = None
    engine.runner.graphs = None
    md.engine = None
    del engine
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def report(results: dict, out: str, name: str = "bench.json") -> None:
    """Write out/name and print the results as a table."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        json.dump(results, f, indent=2)
    print("\n| measure | value |\n| --- | --- |")
    for k, v in results.items():
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")


def card_facts(bandwidth: float) -> dict:
    """What a kernel benchmark's results start with: the card, the commit
    (TIDAL_COMMIT: the device's copy of .git can lag the tree), the date and
    the copy bandwidth measured in the run."""
    return {
        "gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
        "commit": os.environ.get("TIDAL_COMMIT", "unknown"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_tb_s": bandwidth / 1e12,
    }


def write_lines(results: dict, lines: list[str], out: str, name: str, note: str = "") -> None:
    """Write out/name (the results as JSON), then print the card line (with
    `note` after it) and the benchmark's own table lines."""
    with open(os.path.join(out, name), "w") as f:
        json.dump(results, f, indent=1)
    print(f"{results['gpu']}, commit {results['commit']}, copy bandwidth {results['copy_bandwidth_tb_s']:.2f} TB/s{note}\n")
    print("\n".join(lines))
