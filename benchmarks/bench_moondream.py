"""Moondream 3 on one GPU: tidal's fast path (Triton kernels, CUDA graphs) and
torch path, at full size with random bf16 weights (never zeros), each figure
beside its floor: the bytes the step must read over the copy bandwidth
measured in the same run.

    PYTHONPATH=. python3 benchmarks/bench_moondream.py [--out DIR] [--quick] [--tiny] [--only PART]

Beside tidal, in the same run on the same weights: the model authors' reference
implementation, eager and under its own torch.compile (when it has been fetched
into peers/moondream3: see benchmarks/reference_peer.py), and the mixed workload
through the Python API and the HTTP server (benchmarks/mixed_workload.py).

Method: fixed output lengths (a skill that never stops early; detect and point
forced to N objects), wall clock around whole engine steps with
torch.cuda.synchronize() (each step ends in its one device-to-host read),
medians after warm-up. Prints a table last; writes DIR/bench.json.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script or imported as benchmarks.bench_moondream
import targets  # noqa: E402
from measure import (  # noqa: E402
    DEV,
    back_to_back_ms,
    close_model,
    copy_bandwidth,
    report,
    sync,
    timed,
)

from tidal.api import Moondream
from tidal.core import OutputSpec, StepResult
from tidal.engine.engine import EngineConfig
from tidal.engine.request import Request
from tidal.engine.skill import Skill
from tidal.images import image_key, pixels_key
from tidal.models.moondream3.config import MoondreamConfig
from tidal.models.moondream3.model import Moondream3Model
from tidal.models.moondream3.processor import overlap_crops_tensor
from tidal.models.moondream3.skills import LocateSkill
from tidal.models.moondream3.tiny import build_tokenizer, init_random_

FULL = MoondreamConfig()  # --tiny swaps in the embedded tiny shapes for a CPU dry run
KV_BYTES_PER_POSITION = 0  # set in main: all layers' K and V of one position
PARTS = ("decode", "skinny", "branches", "overlap", "latency", "eager_extend", "torch", "reference", "mixed")


# -- helpers ---------------------------------------------------------------------
class FixedLength(Skill):
    """Greedy text of exactly n tokens (never stops early), for fixed-length timing."""

    name = "fixed"

    def __init__(self, n: int, temperature: float = 0.0) -> None:
        super().__init__()
        self.n, self.steps, self.temperature = n, 0, temperature

    def next_output(self) -> OutputSpec:
        return OutputSpec(temperature=self.temperature, top_p=0.9, seed=7, step=self.steps)

    def last_output_next(self) -> bool:
        return self.steps + 1 >= self.n

    def spec_after_token(self) -> OutputSpec | None:
        return None if self.last_output_next() else OutputSpec(temperature=self.temperature, top_p=0.9, seed=7, step=self.steps + 1)

    def on_output(self, out: StepResult) -> list | None:
        self.steps += 1
        return None if self.steps >= self.n else [out.token]

    def result(self) -> dict:
        return {"steps": self.steps}


class ForcedObjects(LocateSkill):
    """Detect/point that always finds max_objects (random weights may say eos at once)."""

    def on_output(self, out: StepResult):
        return super().on_output(replace(out, token=1, coord_over_eos=True))


def build(config: MoondreamConfig, dtype: torch.dtype, seed: int = 0) -> Moondream3Model:
    with torch.device("meta"):
        model = Moondream3Model(config)
    model = model.to(dtype).to_empty(device=DEV)
    init_random_(model, seed)
    model.text.setup_runtime(DEV)
    return model.eval().requires_grad_(False)


def image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def run_to_end(md: Moondream, reqs: list[Request]) -> None:
    for r in reqs:
        md.engine.add_request(r)
    while not all(r.finished for r in reqs):
        md.engine.step()


# -- floors ------------------------------------------------------------------------
def weight_bytes(model: Moondream3Model) -> tuple[int, int, int]:
    """(bytes every decode step reads whatever the batch: attention, dense MLPs,
    routers, norms, lm_head, region heads; bytes of one expert of one layer;
    MoE layers)."""
    expert = moe_layers = 0
    dense = 0
    for name, p in model.text.named_parameters():
        if p.dim() == 3:  # stacked experts [E, out, in]
            expert += p[0].numel() * p.element_size()
            moe_layers += name.endswith("fc1.weight")
            continue
        if name == "wte":
            continue  # one row per token
        dense += p.numel() * p.element_size()
    dense += sum(p.numel() * p.element_size() for n, p in model.region.named_parameters() if "decoder" in n)
    return dense, expert // max(moe_layers, 1), moe_layers


def decode_floor_ms(model: Moondream3Model, batch: int, context: int, bandwidth: float) -> float:
    """Bytes a decode step must read: the dense weights, the experts the batch
    routes to (expected distinct experts of 8-of-64 uniform routing), and every
    sequence's cached K/V."""
    dense, expert, moe_layers = weight_bytes(model)
    moe = model.config.text.moe
    used = moe.num_experts * (1 - (1 - moe.experts_per_token / moe.num_experts) ** batch) if moe else 0
    total = dense + moe_layers * used * expert + batch * context * KV_BYTES_PER_POSITION
    return total / bandwidth * 1000


# -- measurements -------------------------------------------------------------------------
def decode_sweep(md: Moondream, batches: tuple[int, ...], context: int, tokens: int, results: dict, label: str, bandwidth: float) -> None:
    """ms per decode step with `context` cached positions per sequence (distinct
    prompts, no sharing). Requests never stop by themselves: once every one is
    decoding, `tokens` steps are timed, each checked to hold the whole batch."""
    for batch in batches:
        reqs = [Request(skill=FixedLength(10**6), pending=[0] + [(10 + 7 * i + j) % 50000 + 10 for j in range(context - 1)], bidir_len=0) for i in range(batch)]
        for r in reqs:
            md.engine.add_request(r)
        while any(not r.history or r.pending_len > 1 for r in reqs):
            md.engine.step()  # the prefills
        ms = back_to_back_ms(md.engine, batch, tokens)
        for r in reqs:
            md.engine.abort(r)
        results[f"{label}_decode_b{batch}_ms"] = ms
        results[f"{label}_decode_b{batch}_tok_s"] = batch * 1000 / ms
        results.setdefault(f"floor_decode_b{batch}_ms", decode_floor_ms(md.model, batch, context + tokens // 2, bandwidth))  # the first sweep's (the fast path's, where it ran)
        print(f"{label} decode batch {batch}: {ms:.2f} ms/step, {batch * 1000 / ms:.0f} tok/s (floor {results[f'floor_decode_b{batch}_ms']:.2f} ms)", flush=True)


def flipped_sweep(module, switch: str, labels: tuple[str, str], make, tokens: int, results: dict, bandwidth: float) -> None:
    """The decode sweep to batch 32 with module.switch (a process-wide bool)
    the other way from its default, on an engine make() builds then; results
    under labels[0] when that turns it on, labels[1] when off."""
    default = getattr(module, switch)
    setattr(module, switch, not default)
    try:
        md = make()
        decode_sweep(md, (1, 8, 32), 740, tokens, results, labels[1] if default else labels[0], bandwidth)
        close_model(md)
    finally:
        setattr(module, switch, default)


def first_output(md: Moondream, img: Image.Image, question_ids: list[int]) -> None:
    """A query's first output as the API makes it: hash the pixels; crops and
    encoder only when the prefix cache lacks the image."""
    ref = md._image_item(img)
    run_to_end(md, [Request(skill=FixedLength(1), pending=[0, ref, 1, 15381, 2, *question_ids, 3], bidir_len=730)])


def ttft(md: Moondream, results: dict, reps: int, label: str) -> None:
    """Time to the first output of a query: crops, vision encoder, image prefill
    and prompt; cold (a new image each time) and with the image cached."""
    for name, (w, h) in {"378": (378, 378), "1080p": (1920, 1080)}.items():
        # the images exist before the clock starts (a 1920x1080 random image takes
        # ~15 ms to make on a 2-core CPU: until 2026-12-06 it was inside the cold figure)
        fresh = iter([image(w, h, seed) for seed in range(1000, 1001 + reps)])  # the warm-up's, then one a repetition
        results[f"{label}_ttft_{name}_cold_ms"] = statistics.median(timed(lambda: first_output(md, next(fresh), [54, 60, 71]), reps))
        img = image(w, h, 5)
        first_output(md, img, [54])
        qs = iter(range(100, 200))
        results[f"{label}_ttft_{name}_cached_ms"] = statistics.median(timed(lambda: first_output(md, img, [next(qs), 61]), reps))
        results[f"{label}_image_item_{name}_ms"] = statistics.median(timed(lambda: md._image_item(img), reps))  # of the cached figure: the host's image prep (pixels, key)
        # the same image sent as JPEG bytes (as HTTP clients do): known by the bytes' hash once decoded, so
        # not decoded again while cached; beside it what decoding and hashing them costs each time
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        jpeg = buf.getvalue()
        first_output(md, jpeg, [54])
        results[f"{label}_ttft_{name}_cached_jpeg_ms"] = statistics.median(timed(lambda: first_output(md, jpeg, [next(qs), 61]), reps))
        results[f"{label}_image_item_jpeg_{name}_ms"] = statistics.median(timed(lambda: md._image_item(jpeg), reps))
        results[f"decode_and_key_jpeg_{name}_ms"] = statistics.median(timed(lambda: pixels_key(md._pixels(jpeg)), reps))
        img = image(w, h, 3)
        pixels = torch.from_numpy(np.asarray(img)).to(DEV)
        results[f"crops_{name}_ms"] = statistics.median(timed(lambda: overlap_crops_tensor(pixels, md.config.vision), reps))
        results[f"hash_{name}_ms"] = statistics.median(timed(lambda: image_key(img), reps))
        # of the hash: the PIL image's pixels as an array, and the page faults of a key (fresh buffers faulted in?)
        results[f"pixels_{name}_ms"] = statistics.median(timed(lambda: np.asarray(img), reps))
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(reps):
            image_key(img)
        results[f"hash_{name}_page_faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / reps
        arr = np.asarray(img)
        results[f"{label}_encode_{name}_ms"] = statistics.median(timed(lambda: md.engine.runner.encode_image(arr), reps))
        print(f"{label} ttft {name}: cold {results[f'{label}_ttft_{name}_cold_ms']:.1f} ms, cached {results[f'{label}_ttft_{name}_cached_ms']:.1f} ms (of it: the image's pixels and key {results[f'{label}_image_item_{name}_ms']:.2f} ms; hash {results[f'hash_{name}_ms']:.2f} ms with the array {results[f'pixels_{name}_ms']:.2f} ms and {results[f'hash_{name}_page_faults']:.0f} page faults, crops on the device {results[f'crops_{name}_ms']:.2f} ms, whole image encode {results[f'{label}_encode_{name}_ms']:.1f} ms); as JPEG bytes cached {results[f'{label}_ttft_{name}_cached_jpeg_ms']:.1f} ms (image prep {results[f'{label}_image_item_jpeg_{name}_ms']:.2f} ms, where decoding and keying them takes {results[f'decode_and_key_jpeg_{name}_ms']:.2f})", flush=True)


def locate(md: Moondream, results: dict, reps: int, label: str) -> None:
    """detect and point of 10 objects: latency alone, throughput at batch 32."""
    enc = md.encode_image(image(800, 600, 3))
    for skill, with_size in (("detect", True), ("point", False)):
        def job():
            items, bidir = md.prompts.locate(md._image_item(enc), "car", skill)
            return Request(skill=ForcedObjects(md.config.tokenizer, 10, with_size), pending=items, bidir_len=bidir)

        results[f"{label}_{skill}_10_ms"] = statistics.median(timed(lambda: run_to_end(md, [job()]), reps))
        ms = statistics.median(timed(lambda: run_to_end(md, [job() for _ in range(32)]), max(1, reps // 2)))
        results[f"{label}_{skill}_10_b32_req_s"] = 32 * 1000 / ms
        print(f"{label} {skill} 10 objects: {results[f'{label}_{skill}_10_ms']:.1f} ms alone, {32 * 1000 / ms:.1f} req/s at batch 32", flush=True)


def count_syncs(md: Moondream) -> int:
    """Synchronizing CUDA calls in one batch-1 decode step (-1 off CUDA)."""
    if DEV.type != "cuda":
        return -1
    import warnings

    req = Request(skill=FixedLength(50), pending=[0, 1, 2, 3], bidir_len=0)
    md.engine.add_request(req)
    for _ in range(3):
        md.engine.step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        md.engine.step()
        torch.cuda.set_sync_debug_mode("default")
    md.engine.abort(req)
    return sum("called a synchronizing" in str(w.message) for w in caught)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on any device: a dry run of the script itself")
    ap.add_argument("--only", default=None, help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
    ap.add_argument("--mixed-only-default", action="store_true", help="mixed part: only the default engine, through the engine at concurrency 64 (no HTTP, no variants)")
    ap.add_argument("--host-profile", action="store_true", help="mixed part: cProfile the engine thread's steps at the highest concurrency")
    ap.add_argument("--memory-gb", type=float, default=None, help="cap this process's device memory (e.g. 24 for a 24 GB card)")
    args = ap.parse_args()
    global FULL, KV_BYTES_PER_POSITION
    tiny_overrides = None
    if args.tiny:
        import copy

        from tidal.models.moondream3.tiny import TINY_OVERRIDES

        tiny_overrides = copy.deepcopy(TINY_OVERRIDES)
        tiny_overrides["vision"]["enc_n_layers"] = 27  # the reference takes its crop grid (27x27) from this
        FULL = MoondreamConfig.from_dict(tiny_overrides)
    tc = FULL.text
    KV_BYTES_PER_POSITION = 2 * tc.n_layers * tc.n_kv_heads * tc.head_dim * 2
    # the device's copy of the tree may carry a stale .git: the caller names the commit
    commit = os.environ.get("TIDAL_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    results: dict = {
        "gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": commit,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": ", ".join(["tiny shapes (a dry run)"] * args.tiny + ["quick"] * args.quick) or "full",
    }
    if args.memory_gb is not None and DEV.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.memory_gb * 2**30 / torch.cuda.get_device_properties(DEV).total_memory)
        results["memory_cap_gb"] = args.memory_gb
    bandwidth = copy_bandwidth()
    results["copy_bandwidth_tb_s"] = bandwidth / 1e12
    reps = 3 if args.quick else 5
    batches = (1, 8, 32) if args.quick else (1, 8, 32, 64, 128, 256)

    t0 = time.perf_counter()
    model = build(FULL, torch.bfloat16)
    sync()
    results["build_s"] = time.perf_counter() - t0
    results["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    tok = build_tokenizer(model.config.text.vocab_size)

    kernels = DEV.type == "cuda"
    parts = set(args.only.split(",")) if args.only else set(PARTS)
    if parts - set(PARTS):
        ap.error(f"unknown parts {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")
    if "decode" in parts:  # fast path: kernels, CUDA graphs up to batch 256
        t0 = time.perf_counter()
        md = Moondream(model, tok, EngineConfig(max_running=max(batches), prefix_cache=False, kernels=kernels))
        results["fast_warmup_s"] = time.perf_counter() - t0
        results["fast_graph_capture_s"] = md.engine.warmup_s
        results["syncs_per_decode_step"] = count_syncs(md)
        decode_sweep(md, batches, 740, 16 if args.quick else 32, results, "fast", bandwidth)
        graphs = md.engine.runner.graphs
        if graphs is not None:
            results["fast_decode_graph_replays"] = graphs.replays
            results["fast_decode_eager_runs"] = graphs.eager_runs
        md = close_model(md)

    if "skinny" in parts:  # the decode sweep to batch 16 with the other EngineConfig.skinny_gemm choices (decode ran "auto")
        for mode in ("off", "all"):
            md = Moondream(model, tok, EngineConfig(max_running=16, prefix_cache=False, kernels=kernels, skinny_gemm=mode))
            decode_sweep(md, (1, 8, 16), 740, 16 if args.quick else 32, results, f"skinny_{mode}", bandwidth)
            md = close_model(md)

    if "overlap" in parts:  # the decode sweep to batch 32 and detect/point with EngineConfig.overlap off (decode and latency run it on)
        md = Moondream(model, tok, EngineConfig(max_running=32, prefix_cache=False, kernels=kernels, overlap=False))
        decode_sweep(md, (1, 8, 32), 740, 16 if args.quick else 32, results, "no_overlap", bandwidth)
        locate(md, results, reps, "no_overlap")
        md = close_model(md)
    if "branches" in parts:  # each block's two branches on the other number of streams than the default (text.PARALLEL_BRANCHES)
        from tidal.models.moondream3 import text as text_model

        flipped_sweep(text_model, "PARALLEL_BRANCHES", ("branches", "one_stream"), lambda: Moondream(model, tok, EngineConfig(max_running=32, prefix_cache=False, kernels=kernels)), 16 if args.quick else 32, results, bandwidth)

    if "latency" in parts:
        md = Moondream(model, tok, EngineConfig(max_running=64, kernels=kernels))  # prefix cache on
        ttft(md, results, reps, "fast")
        locate(md, results, reps, "fast")
        results["fast_share_of_steps_replayed"] = md.engine.runner.graph_replays / max(md.engine.stats.steps, 1)
        md = close_model(md)
        if DEV.type == "cuda":
            results["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30

    if "eager_extend" in parts:  # the latency part again with extend steps run eagerly (EngineConfig.prefill_graphs off)
        t0 = time.perf_counter()
        md = Moondream(model, tok, EngineConfig(max_running=64, kernels=kernels, prefill_graphs=False))
        results["eager_extend_warmup_s"] = time.perf_counter() - t0
        ttft(md, results, reps, "eager_extend")
        locate(md, results, reps, "eager_extend")
        results["eager_extend_share_of_steps_replayed"] = md.engine.runner.graph_replays / max(md.engine.stats.steps, 1)
        md = close_model(md)

    if "torch" in parts:  # the torch path on the same weights: batch-1 decode and time to first output
        md = Moondream(model, tok, EngineConfig(max_running=8, prefix_cache=False, kernels=False))
        decode_sweep(md, (1,), 740, 4, results, "torch", bandwidth)
        first_output(md, image(378, 378, 9), [54])
        results["torch_ttft_378_cold_ms"] = statistics.median(timed(lambda: first_output(md, image(378, 378, 10), [54]), 2, warmup=0))
        md = close_model(md)

    if "reference" in parts:
        import reference_peer

        if not reference_peer.available():
            print(f"the reference is not in {reference_peer.DEFAULT_PATH}: skipped (see benchmarks/reference_peer.py)", flush=True)
        else:
            ref = reference_peer.load(model, tok, tiny_overrides)
            images = {"378": image(378, 378, 21), "1080p": image(1920, 1080, 22)}
            same_model_check(model, tok, ref, images, results, kernels)
            reference_peer.measure(ref, images, results, "ref_eager", 8 if args.tiny else 16, 2)
            results["ref_compile_s"] = reference_peer.compile_(ref)
            print(f"reference compile: {results['ref_compile_s']:.0f} s", flush=True)
            reference_peer.measure(ref, images, results, "ref_compiled", 32, reps)
            del ref
            import gc

            torch._dynamo.reset()
            gc.collect()
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
    if "mixed" in parts:  # last: FastAPI keeps the app it served (and so its engine) in a cache
        import mixed_workload

        md = Moondream(model, tok, EngineConfig(max_running=64, kernels=kernels))
        if args.mixed_only_default:
            mixed_workload.measure(md, results, "fast", concurrencies=(4,) if args.tiny else (64,), requests_per_client=2 if args.quick else 4, vias=("engine",))
        else:
            mixed_workload.measure(md, results, "fast", concurrencies=(1, 4) if args.tiny else (1, 16, 64), requests_per_client=2 if args.quick else 4, host_profile=args.host_profile)
        md = close_model(md)
        variants: dict[str, dict] = {}
        if not args.mixed_only_default:
            variants["fast_budget8k"] = {"token_budget": 8192}  # larger prefill steps: the experts' weights read once for more images
            if kernels:  # the busy steps (image prefills with decode rows riding along) run eagerly, as before prefill graphs
                variants["fast_eager_extend"] = {"prefill_graphs": False}
            variants["fast_encode_ahead"] = {"encode_ahead": True}  # held-back images encoded beside the running step
            variants["fast_kv_fp8"] = {"kv_dtype": "fp8"}  # the float8 KV cache: the decode rows' K/V reads halved (a numerics option)
        for label, config in variants.items():
            md = Moondream(model, tok, EngineConfig(max_running=64, kernels=kernels, **config))
            mixed_workload.measure(md, results, label, concurrencies=(4,) if args.tiny else (64,), requests_per_client=2 if args.quick else 4, vias=("engine",))
            md = close_model(md)

    report(results, args.out)
    print("\n" + targets.write_targets(results, targets.MOONDREAM, args.out, "targets.md"), flush=True)


def same_model_check(model, tok, ref, images: dict, results: dict, kernels: bool) -> None:
    """The reference and tidal's fast path give the same first-answer logits on
    the same image and question (both bf16: agreement to bf16's resolution)."""
    import reference_peer

    md = Moondream(model, tok, EngineConfig(max_running=1, kernels=kernels, cuda_graphs=False, trace_logits=True))
    for name, img in images.items():
        req = Request(skill=FixedLength(1), pending=[0, md._image_item(img), 1, 15381, 2, 54, 60, 3], bidir_len=730)
        run_to_end(md, [req])
        ours = req.trace[0].logits.float().flatten().cpu()
        theirs = reference_peer.first_logits(ref, img, [54, 60]).cpu()
        err = float((ours - theirs).abs().max() / theirs.abs().max())
        results[f"ref_vs_fast_first_logits_{name}_rel_err"] = err
        results[f"ref_vs_fast_first_token_{name}_same"] = bool(ours.argmax() == theirs.argmax())
        print(f"same model check, {name}: first-answer logits within {err:.2e} relative of the reference; same token: {bool(ours.argmax() == theirs.argmax())}", flush=True)
    close_model(md)


if __name__ == "__main__":
    main()
