"""How long the engine's thread waits for the GIL while request threads decode
image uploads (CPU only; no model): a thread that sleeps 2 ms (a GPU step,
GIL released) then needs the GIL, beside threads decoding a 4 MB base64 body
in a loop. Compares binascii's decode with the server's (numpy's loops, GIL released),
at Python's default 5 ms switch interval and at the server's 1 ms.

    PYTHONPATH=. python3 benchmarks/gil_handover.py [--threads 2]
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import threading
import time

from tidal.server.config import ServerConfig
from tidal.server.images import _base64


def wake_up_delays(decode, interval: float, threads: int, samples: int = 300) -> tuple[float, float]:
    """-> (mean, p99) ms between the engine thread's 2 ms sleep ending and it running again."""
    sys.setswitchinterval(interval)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            decode()

    workers = [threading.Thread(target=load) for _ in range(threads)]
    for w in workers:
        w.start()
    delays = []
    for _ in range(samples):
        t0 = time.perf_counter()
        time.sleep(0.002)
        delays.append((time.perf_counter() - t0 - 0.002) * 1e3)
    stop.set()
    for w in workers:
        w.join()
    delays.sort()
    return statistics.mean(delays), delays[int(0.99 * len(delays))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2, help="request threads decoding at once")
    args = ap.parse_args()
    text = base64.b64encode(os.urandom(3_000_000)).decode()
    config = ServerConfig()
    default = sys.getswitchinterval()
    print(f"| decoding | switch interval | engine wake-up delay mean | p99 |  ({args.threads} decoding threads, {os.cpu_count()} cores)")
    print("| --- | --- | --- | --- |")
    for name, decode in (("binascii", lambda: base64.b64decode(text, validate=True)), ("server (tidal.base64_decode)", lambda: _base64(text, config).decode())):
        for interval in (0.005, 0.001):
            mean, p99 = wake_up_delays(decode, interval, args.threads)
            print(f"| {name} | {interval * 1e3:.0f} ms | {mean:.2f} ms | {p99:.2f} ms |", flush=True)
    sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
