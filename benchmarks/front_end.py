"""The server's own work per request, with an engine that answers at once: the
mixed workload's requests (benchmarks/mixed_workload.py: JPEG data URLs of
378x378 to 1920x1080 noise images, half of them sent before) through the HTTP
server, and the same jobs through the Python API from PIL images, while every
submitted request finishes as soon as it reaches the engine's queue (empty
answers). What is left is HTTP, JSON, base64, decoding, hashing, cropping
and building the prompt. The stub engine caches nothing, so every image is
decoded: an upper bound on the decoding the real server does. Beside it a
thread stands in for the engine's: it sleeps 2 ms (a GPU step, GIL released)
and then needs the GIL, and its wake-up delay is what the server's threads
would add to each step (over the whole run: the HTTP runs' start-up, the
client processes spawned and the server started, adds about a second of
quiet samples; the server CPU figure includes handing the bodies to those
processes). Runs anywhere (the embedded tiny Moondream 3 on the
CPU by default).

    PYTHONPATH=. python3 benchmarks/front_end.py [--concurrency 64] [--requests 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mixed_workload  # noqa: E402


def instant_engine(md) -> None:
    """Every request submitted from now on finishes at once, unanswered."""
    from tidal.engine.loop import _DONE, RequestHandle

    def submit(req):
        handle = RequestHandle(req, md.loop)
        req.finished_at = time.monotonic()
        handle._push(_DONE, None)
        return handle

    md.loop.submit = submit


class WakeUpProbe:
    """A thread that sleeps 2 ms at a time and records how late it runs again (ms)."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(0.002)
            self.delays.append((time.perf_counter() - t0 - 0.002) * 1e3)

    def __enter__(self) -> "WakeUpProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> tuple[float, float]:
        """(mean, p99) ms."""
        d = sorted(self.delays)
        return statistics.mean(d), d[int(0.99 * (len(d) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="HTTP runs of the same jobs (the first warms the server up)")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny Moondream 3)")
    args = ap.parse_args()
    from tidal.api import Moondream

    if args.model is None:
        from tidal.models.moondream3.tiny import ensure_tiny_checkpoint

        args.model = str(ensure_tiny_checkpoint())
    md = Moondream.from_pretrained(args.model, device="cpu")
    instant_engine(md)
    jobs, images = mixed_workload.make_jobs(args.requests, seed=args.concurrency)
    urls = mixed_workload._jpeg_urls(images)
    mixed_workload._jpeg_urls = lambda _: urls  # encoded once, outside the timed runs
    print(f"| path | requests | concurrency | req/s | p50 ms | server CPU ms a request | engine-like thread's wake-up delay, mean / p99 ms | CPU over wall: clients' process / server's event loop |  ({os.cpu_count()} cores)")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    runs = [("API, PIL images", mixed_workload.run_engine)] + [(f"HTTP, JPEG data URLs (round {i + 1})", mixed_workload.run_http) for i in range(args.rounds)]
    for name, run in runs:
        cpu0 = time.process_time()  # this process only: the HTTP clients run in another
        with WakeUpProbe() as probe:
            r = run(md, jobs, images, args.concurrency)
        cpu = (time.process_time() - cpu0) / r["requests"] * 1e3
        mean, p99 = probe.summary()
        shares = "" if "client_cpu_share" not in r else f" {r['client_cpu_share']:.2f} / {r['event_loop_cpu_share']:.2f} |"
        print(f"| {name} | {r['requests']} | {args.concurrency} | {r['req_s']:.1f} | {r['p50_ms']:.0f} | {cpu:.2f} | {mean:.2f} / {p99:.2f} |{shares}", flush=True)
    md.close()


if __name__ == "__main__":
    main()
