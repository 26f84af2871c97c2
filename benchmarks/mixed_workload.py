"""The mixed workload of the performance issue, through the Python API (the engine
in process) and through the HTTP server (uvicorn on localhost, a client per slot).

Mix: 70% short-answer queries (8 tokens), 10% captions (64 tokens), 10% detect and
10% point (5 objects each); images from 378x378 to 1920x1080, half of the requests
on an image seen before (the prefix cache's share). `concurrency` clients each send
their next request when the last one answered (closed loop); HTTP clients run in
other processes, as real clients would, spread over CLIENT_PROCESSES of them with
their JSON bodies encoded beforehand: until 2026-12-07 one process of clients
encoding each body as it sent it was itself the limit on the H100 host (94% of
a core, ~50 req/s with a server that answers at once).

Random weights would stop at an end token whenever it happens to win: while the
workload runs, the end token's logit bias is lowered so every request produces
its full length (restored afterwards).
"""

from __future__ import annotations

import base64
import cProfile
import io
import json
import pstats
import random
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

SIZES = [(378, 378), (640, 480), (800, 600), (1024, 768), (1280, 720), (1920, 1080)]
QUESTIONS = ["what is this", "how many cars are there", "what color is the sky", "is there a dog", "where is the person"]


@dataclass(frozen=True)
class Job:
    skill: str  # query | caption | detect | point
    image: int  # index into the image list
    text: str


def make_jobs(n: int, seed: int = 0) -> tuple[list[Job], list[Image.Image]]:
    """n jobs of the mix; half reuse an image an earlier job used."""
    rng = random.Random(seed)
    images: list[Image.Image] = []
    jobs = []
    for i in range(n):
        skill = rng.choices(["query", "caption", "detect", "point"], weights=[70, 10, 10, 10])[0]
        if images and rng.random() < 0.5:
            idx = rng.randrange(len(images))
        else:
            w, h = rng.choice(SIZES)
            arr = np.random.default_rng(seed * 100_000 + i).integers(0, 255, (h, w, 3), dtype=np.uint8)
            images.append(Image.fromarray(arr))
            idx = len(images) - 1
        jobs.append(Job(skill, idx, rng.choice(QUESTIONS) if skill == "query" else rng.choice(["car", "person", "dog"])))
    return jobs, images


@contextmanager
def no_early_stop(model, eos_id: int):
    """Every request runs its full length: the end token never wins."""
    bias = model.text.lm_head.bias
    saved = bias[eos_id].clone()
    with torch.no_grad():
        bias[eos_id] = -1e4
    try:
        yield
    finally:
        with torch.no_grad():
            bias[eos_id] = saved


def _call_api(md, job: Job, image) -> None:
    if job.skill == "query":
        md.query(image, job.text, settings={"max_tokens": 8})
    elif job.skill == "caption":
        md.caption(image, "normal", settings={"max_tokens": 64})
    elif job.skill == "detect":
        md.detect(image, job.text, {"max_objects": 5})
    else:
        md.point(image, job.text, {"max_objects": 5})


def _closed_loop(jobs: list[Job], concurrency: int, call) -> dict:
    """Run every job with `concurrency` clients; -> requests/s and latency percentiles."""
    latencies: list[float] = []
    lock = threading.Lock()
    queue = iter(list(enumerate(jobs)))

    def client() -> None:
        while True:
            with lock:
                nxt = next(queue, None)
            if nxt is None:
                return
            t0 = time.perf_counter()
            call(nxt[1])
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    return _summary(latencies, wall)


def _summary(latencies: list[float], wall: float) -> dict:
    """Requests/s and latency percentiles (ms) of a run."""
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "req_s": len(lat) / wall,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000,
    }


def run_engine(md, jobs: list[Job], images: list[Image.Image], concurrency: int) -> dict:
    """Through the Python API (decode, hash, crops, engine), all in this process."""
    return _closed_loop(jobs, concurrency, lambda job: _call_api(md, job, images[job.image]))


def _jpeg_urls(images: list[Image.Image]) -> list[str]:
    urls = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_server(md, config=None, **uvicorn_options):
    """tidal's app on a localhost port, in a thread of this process; yields
    (base URL, the app's ServerState, the thread running its event loop). config: a ServerConfig;
    uvicorn_options: e.g. http="httptools", loop="uvloop"."""
    import uvicorn

    from tidal.server.app import create_app

    port = _free_port()
    app = create_app(md, config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", app.state.tidal, thread
    finally:
        server.should_exit = True
        thread.join(10)


def _body(job: Job, url: str) -> dict:
    body: dict = {"image_url": url}
    if job.skill == "query":
        body |= {"question": job.text, "settings": {"max_tokens": 8}}
    elif job.skill == "caption":
        body |= {"length": "normal", "settings": {"max_tokens": 64}}
    else:
        body |= {"object": job.text, "settings": {"max_objects": 5}}
    return body


CLIENT_PROCESSES = 4  # one Python process of asyncio clients tops out near 50 req/s on the H100 host (bodies, HTTP)


def _client_process(base: str, jobs: list[tuple[str, bytes]], concurrency: int, barrier, results) -> None:
    """In a process of its own (the server's GIL is the server's): `concurrency`
    asyncio clients, each sending its next request when the last one answered,
    once every client process is ready (barrier). Puts (latencies s, start and
    end as time.time(), CPU s of this process) on results. Bodies come encoded:
    a real client's JSON encoding happens on its own machine."""
    import asyncio

    import httpx

    async def main() -> tuple[list[float], float, float, float]:
        queue = list(reversed(jobs))
        latencies: list[float] = []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

            async def worker() -> None:
                while queue:
                    skill, body = queue.pop()
                    t0 = time.perf_counter()
                    r = await client.post(f"/v1/{skill}", content=body, headers=headers)
                    if r.status_code != 200:
                        raise RuntimeError(f"{skill}: HTTP {r.status_code}: {r.text[:200]}")
                    latencies.append(time.perf_counter() - t0)

            barrier.wait(timeout=300)  # before any request: the processes start together (a process that died breaks it)
            t0, cpu0 = time.time(), time.process_time()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return latencies, t0, time.time(), time.process_time() - cpu0

    try:
        results.put(asyncio.run(main()))
    except Exception as exc:  # the parent raises it
        results.put(exc)


def _http_clients(base: str, jobs: list[tuple[str, bytes]], concurrency: int, processes: int = CLIENT_PROCESSES) -> tuple[list[float], float, float]:
    """`concurrency` clients spread over `processes` client processes, jobs
    dealt round-robin. -> (latencies s, wall s from the first start to the
    last end, the busiest client process's CPU s)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    processes = max(1, min(processes, concurrency, len(jobs)))
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    per = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    procs = [ctx.Process(target=_client_process, args=(base, jobs[i::processes], per[i], barrier, results), daemon=True) for i in range(processes)]
    for p in procs:
        p.start()
    outs = [results.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(30)
    for out in outs:
        if isinstance(out, Exception):
            raise out
    latencies = [x for out in outs for x in out[0]]
    wall = max(out[2] for out in outs) - min(out[1] for out in outs)
    return latencies, wall, max(out[3] for out in outs)


def thread_cpu_s(thread: threading.Thread | None) -> float:
    """CPU seconds a live thread of this process has run (nan where unknown)."""
    if thread is None or thread.ident is None or not thread.is_alive():
        return float("nan")
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (AttributeError, OSError):
        return float("nan")


def run_http(md, jobs: list[Job], images: list[Image.Image], concurrency: int, config=None, **uvicorn_options) -> dict:
    """Through the HTTP server (in this process, as `tidal serve` runs it), driven
    by clients in other processes (CLIENT_PROCESSES): JPEG data URLs, JSON bodies, keep-alive connections.
    Beside the clients' figures, the server's own means (ms): preparing a request
    (validation, image decoding and hashing: `prepare_ms`) and the engine's
    arrival to finish (`engine_ms`); the rest of a client's latency is HTTP
    (bodies sent and read, JSON, the response). config, uvicorn_options: http_server's."""
    urls = _jpeg_urls(images)
    work = [(job.skill, json.dumps(_body(job, urls[job.image])).encode()) for job in jobs]
    with http_server(md, config, **uvicorn_options) as (base, state, loop_thread):
        threads = {"event_loop": loop_thread, "engine_thread": md.loop._thread}
        cpu0 = {k: thread_cpu_s(t) for k, t in threads.items()}
        process0 = time.process_time()
        latencies, wall, client_cpu = _http_clients(base, work, concurrency)
        cpu = {k: thread_cpu_s(t) - cpu0[k] for k, t in threads.items()}
        process = time.process_time() - process0
    r = _summary(latencies, wall)
    # CPU over the clients' wall (a share near 1 is a thread at its limit; the server's
    # window is a little wider than the clients': it spans the client processes' start)
    r["client_cpu_share"] = client_cpu / wall
    r["event_loop_cpu_share"] = cpu["event_loop"] / wall
    r["engine_thread_cpu_share"] = cpu["engine_thread"] / wall
    r["server_cpu_cores"] = process / wall
    r["prepare_ms"] = _histogram_mean(state.metrics.prepare) * 1e3
    r["engine_ms"] = _histogram_mean(state.metrics.latency) * 1e3
    r["mean_ms"] = statistics.mean(latencies) * 1e3
    return r


def _histogram_mean(histogram) -> float:
    """Mean of a labelled prometheus Histogram's observations over all its labels."""
    total = count = 0.0
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return total / count if count else float("nan")


@contextmanager
def step_log(engine, host_profile=None):
    """Record each engine step of a run as (seconds, prefill positions, decode
    rows): wraps engine.step on the instance, so the engine thread's loop
    calls the wrapper. Every step ends in its one device-to-host read, so a
    step's wall time holds its GPU work. host_profile: a cProfile.Profile to
    run inside each step (the engine thread's Python, where the host goes)."""
    log: list[tuple[float, int, int]] = []
    step = engine.step

    def timed():
        before = engine.stats.steps
        t0 = time.perf_counter()
        if host_profile is not None:
            host_profile.enable()
        out = step()
        if host_profile is not None:
            host_profile.disable()
        dt = time.perf_counter() - t0
        chunks = engine.stats.last_chunks if engine.stats.steps > before else []  # nothing ran: no chunks
        log.append((dt, sum(n for _, n in chunks if n > 1), sum(1 for _, n in chunks if n == 1)))
        return out

    engine.step = timed
    try:
        yield log
    finally:
        del engine.step


def where_it_went(log: list[tuple[float, int, int]], wall: float) -> dict:
    """Steps that prefilled (images, prompts; decode rows may ride along), decode-only
    steps, and the engine's time outside steps (waiting for requests, the host)."""
    pre = [s for s in log if s[1] > 0]
    dec = [s for s in log if s[1] == 0 and s[2] > 0]
    busy = sum(s[0] for s in pre) + sum(s[0] for s in dec)
    return {
        "prefill_steps": len(pre),
        "prefill_s": sum(s[0] for s in pre),
        "prefill_positions": sum(s[1] for s in pre),
        "decode_steps": len(dec),
        "decode_s": sum(s[0] for s in dec),
        "decode_mean_batch": sum(s[2] for s in dec) / max(1, len(dec)),
        "outside_steps_s": max(0.0, wall - busy),
    }


def measure(md, results: dict, label: str, concurrencies=(1, 16, 64), requests_per_client: int = 4, min_requests: int = 32, vias=("engine", "http"), host_profile: bool = False) -> None:
    """The mix at each concurrency, through the API and through HTTP. host_profile:
    print where the engine thread's Python went at the highest concurrency
    (cProfile slows the host: its req/s is not the figure to report)."""
    eos = md.config.tokenizer.eos_id
    runs = {"engine": run_engine, "http": run_http}
    with no_early_stop(md.model, eos):
        for via in vias:
            run = runs[via]
            for c in concurrencies:
                n = max(min_requests, c * requests_per_client)
                jobs, images = make_jobs(n, seed=c)
                md.clear_cache()
                steps0, replays0 = md.engine.stats.steps, _replays(md)
                prof = cProfile.Profile() if host_profile and c == max(concurrencies) else None
                with step_log(md.engine, prof) as log:
                    r = run(md, jobs, images, c)
                if prof is not None:
                    print(f"-- engine thread's Python in steps, {via}, concurrency {c} (cProfile: slower than unprofiled) --", flush=True)
                    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
                r |= where_it_went(log, r["requests"] / r["req_s"])  # the clients' window, not the setup around it
                r["steps"] = md.engine.stats.steps - steps0
                r["graph_share"] = (_replays(md) - replays0) / max(r["steps"], 1)
                for k, v in r.items():
                    results[f"{label}_mixed_{via}_c{c}_{k}"] = v
                print(f"{label} mixed via {via}, concurrency {c}: {r['req_s']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms ({r['requests']} requests, {r['steps']} engine steps, {r['graph_share']:.0%} replayed from graphs)", flush=True)
                print(
                    f"  where it went: {r['prefill_steps']} prefill steps {r['prefill_s']:.2f} s ({r['prefill_positions']} positions), "
                    f"{r['decode_steps']} decode-only steps {r['decode_s']:.2f} s (mean batch {r['decode_mean_batch']:.1f}), "
                    f"outside steps {r['outside_steps_s']:.2f} s",
                    flush=True,
                )


def _replays(md) -> int:
    return md.engine.runner.graph_replays
