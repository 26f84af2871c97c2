"""Where an HTTP request's time goes in the mixed workload at 64 clients, and
server settings beside the default, each twice in turn (one model, one engine):

- the client's mean latency, split into the server's preparing of the request
  (validation, image decoding and hashing), the engine's arrival to finish,
  and the rest (HTTP: bodies sent and read, JSON, the response);
- the engine's steps: prefill and decode time, and time outside steps;
- variants: ServerConfig(request_threads=N) (fewer threads decoding at once,
  so fewer contend with the engine's thread for the GIL), uvicorn's C HTTP
  parser and event loop (httptools, uvloop) where installed.

    PYTHONPATH=. python3 benchmarks/http_front.py [--requests-per-client 4] [--tiny]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_moondream  # noqa: E402
import mixed_workload  # noqa: E402

from tidal import EngineConfig, Moondream  # noqa: E402
from tidal.models.moondream3.config import MoondreamConfig  # noqa: E402
from tidal.models.moondream3.tiny import TINY_OVERRIDES, build_tokenizer  # noqa: E402
from tidal.server.config import ServerConfig  # noqa: E402


def variants() -> dict[str, tuple[ServerConfig | None, dict]]:
    """label -> (ServerConfig, uvicorn options)."""
    out: dict[str, tuple[ServerConfig | None, dict]] = {"default": (None, {}), "8 request threads": (ServerConfig(request_threads=8), {})}
    if importlib.util.find_spec("httptools") and importlib.util.find_spec("uvloop"):
        out["httptools + uvloop"] = (None, {"http": "httptools", "loop": "uvloop"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="the tiny shapes on any device (a dry run)")
    ap.add_argument("--variants", default=None, help="comma-separated labels of the server variants to run (default: all)")
    args = ap.parse_args()
    config = MoondreamConfig.from_dict(TINY_OVERRIDES) if args.tiny else MoondreamConfig()
    dev = bench_moondream.DEV
    model = bench_moondream.build(config, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    tok = build_tokenizer(model.config.text.vocab_size)
    md = Moondream(model, tok, EngineConfig(max_running=64, kernels=dev.type == "cuda"))
    c = args.concurrency
    jobs, images = mixed_workload.make_jobs(max(32, c * args.requests_per_client), seed=c)
    print(f"{os.cpu_count()} CPU cores; {len(jobs)} requests at {c} clients")
    print("CPU shares are CPU seconds over the clients' wall seconds: the clients' process, the server's event-loop thread, the engine's thread, and the server process in all (cores)")
    print("| via | round | req/s | p50 ms | client mean ms | prepare ms | engine ms | rest (HTTP) ms | prefill s | decode s | outside steps s | CPU: clients / event loop / engine thread / server |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    chosen = variants() if args.variants is None else {k: v for k, v in variants().items() if k in args.variants.split(",")}
    runs = [("engine (PIL images)", None)] + [(name, v) for _ in range(args.rounds) for name, v in chosen.items()]
    seen: dict[str, int] = {}
    with mixed_workload.no_early_stop(md.model, md.config.tokenizer.eos_id):
        for name, v in runs:
            seen[name] = seen.get(name, 0) + 1
            md.clear_cache()
            with mixed_workload.step_log(md.engine) as log:
                if v is None:
                    r = mixed_workload.run_engine(md, jobs, images, c)
                    r |= dict.fromkeys(("prepare_ms", "engine_ms", "mean_ms", "client_cpu_share", "event_loop_cpu_share", "engine_thread_cpu_share", "server_cpu_cores"), float("nan"))
                else:
                    r = mixed_workload.run_http(md, jobs, images, c, v[0], **v[1])
            r |= mixed_workload.where_it_went(log, r["requests"] / r["req_s"])
            rest = r["mean_ms"] - r["prepare_ms"] - r["engine_ms"]
            print(
                f"| {name} | {seen[name]} | {r['req_s']:.1f} | {r['p50_ms']:.0f} | {r['mean_ms']:.0f} | {r['prepare_ms']:.1f} | {r['engine_ms']:.0f} | {rest:.0f} | "
                f"{r['prefill_s']:.2f} | {r['decode_s']:.2f} | {r['outside_steps_s']:.2f} | "
                f"{r['client_cpu_share']:.2f} / {r['event_loop_cpu_share']:.2f} / {r['engine_thread_cpu_share']:.2f} / {r['server_cpu_cores']:.1f} |",
                flush=True,
            )
    md.close()


if __name__ == "__main__":
    main()
