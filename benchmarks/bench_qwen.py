"""Qwen3-MoE and Qwen3-VL on one GPU: tidal beside transformers on the same
weights (random bf16 of the real shapes, never zeros), each decode figure
beside its floor (the bytes a step must read over the copy bandwidth measured
in the same run).

    PYTHONPATH=. python3 benchmarks/bench_qwen.py --model moe [--out DIR] [--tiny]   # Qwen3-30B-A3B
    PYTHONPATH=. python3 benchmarks/bench_qwen.py --model vl [--out DIR] [--tiny]    # Qwen3-VL-8B

transformers' model holds tidal's own tensors (views where its layout
differs), so both fit on one 80 GB card. First a same-model check: tidal's
fast path and transformers give the same logits for one prompt (bf16, so to
bf16's resolution). Then, with the engine stepped directly (wall clock around
whole steps, each ending in its one device-to-host read; medians):
- decode ms/step and tokens/s at each --batches size, every sequence decoding
  (prompts of --context positions; generation that never stops early);
- end to end: --concurrent requests submitted at once (Qwen3-VL: each with
  its own image), output tokens/s from the first submission to the last token;
- Qwen3-VL: time to first token for one image (new, and cached);
- transformers' generate() per-token time (N and 1 new tokens, the difference).
Prints a table last; writes DIR/bench-qwen3-moe.json or bench-qwen3-vl.json
(-nooverlap, -skinny-MODE, -kv-fp8 before .json for those variants).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import targets  # noqa: E402
from measure import back_to_back_ms, close_model, copy_bandwidth, report, sync  # noqa: E402
from qwen_peers import (  # noqa: E402
    ASSISTANT,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    MOE,
    MOE_TINY,
    NEWLINE,
    USER,
    VISION_END,
    VISION_START,
    VL_TEXT,
    VL_TEXT_TINY,
    VL_VISION,
    VL_VISION_TINY,
    build_moe,
    build_vl,
    hf_decode,
    hf_first_logits_vl,
    hf_moe,
    hf_vl,
)
from step_phases import phases_report, step_phases  # noqa: E402

from tidal.engine.engine import EngineConfig  # noqa: E402
from tidal.engine.request import Request  # noqa: E402
from tidal.engine.sampling import SamplingParams  # noqa: E402
from tidal.llm import LLM  # noqa: E402
from tidal.models.qwen3_vl.model import Qwen3VLModel  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROFILE_DIR = ""  # --profile writes each table here too (main sets it to --out)

# -- requests -------------------------------------------------------------------------
def image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def chat_ids(question: list[int], with_image: bool) -> list[int]:
    """Qwen's chat layout: <|im_start|>user\\n[<|vision_start|><|image_pad|><|vision_end|>]question<|im_end|>\\n<|im_start|>assistant\\n."""
    vision = [VISION_START, IMAGE_TOKEN, VISION_END] if with_image else []
    return [IM_START, USER, NEWLINE, *vision, *question, IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]


def text_prompt(i: int, n: int) -> dict:
    return {"prompt_token_ids": [(7919 * i + 31 * j) % 100_000 + 10 for j in range(n)]}


def new_request(llm: LLM, prompt: dict, max_tokens: int) -> Request:
    skill, items = llm._prepare(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens), ignore_eos=True)
    return Request(skill=skill, pending=items, bidir_len=0)


def run_to_end(llm: LLM, reqs: list[Request], steps: list[tuple[float, int, int]] | None = None) -> None:
    """Step the engine until every request finished; with `steps`, append each
    step's (seconds, prefill positions, decode rows): every step ends in its
    one device-to-host read, so its wall time includes its GPU work."""
    for r in reqs:
        llm.engine.add_request(r)
    finish(llm, reqs, steps)


def finish(llm: LLM, reqs: list[Request], steps: list[tuple[float, int, int]] | None = None) -> None:
    """Step the engine until every (already added) request finished; see run_to_end."""
    while not all(r.finished for r in reqs):
        t0 = time.perf_counter()
        llm.engine.step()
        if steps is not None:
            chunks = llm.engine.stats.last_chunks
            decode = sum(1 for _, n in chunks if n == 1)
            steps.append((time.perf_counter() - t0, sum(n for _, n in chunks if n > 1), decode))


def step_breakdown(steps: list[tuple[float, int, int]], key: str, results: dict) -> str:
    """Where an end-to-end run's time went: steps that prefilled (images,
    prompts; decode rows may ride along) against decode-only steps."""
    pre = [s for s in steps if s[1] > 0]
    dec = [s for s in steps if s[1] == 0]
    results[f"{key}_prefill_steps"], results[f"{key}_prefill_s"] = len(pre), sum(s[0] for s in pre)
    results[f"{key}_prefill_positions"] = sum(s[1] for s in pre)
    results[f"{key}_decode_steps"], results[f"{key}_decode_s"] = len(dec), sum(s[0] for s in dec)
    results[f"{key}_decode_mean_batch"] = sum(s[2] for s in dec) / max(1, len(dec))
    return (
        f"{len(pre)} prefill steps, {results[f'{key}_prefill_s']:.2f} s for {results[f'{key}_prefill_positions']} positions; "
        f"{len(dec)} decode-only steps, {results[f'{key}_decode_s']:.2f} s at a mean batch of {results[f'{key}_decode_mean_batch']:.1f}"
    )


# -- measurements -----------------------------------------------------------------------
def decode_floor_ms(model, batch: int, context: int, bandwidth: float, kv_bytes: int = 2) -> float:
    """Weights a step reads (dense ones, the lm_head, and the experts batch
    tokens are expected to pick) plus every sequence's KV (kv_bytes a value:
    2 for bf16, 1 for a float8 cache), over bandwidth."""
    lm = model.language_model if isinstance(model, Qwen3VLModel) else model
    cfg = lm.config
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
    dense = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if not n.endswith((".fc1", ".fc2")) and n != "embed_tokens")
    sparse = sum(1 for layer in lm.layers if hasattr(layer.mlp, "fc1"))
    used = cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** batch) if cfg.num_experts else 0
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * kv_bytes
    return (dense + sparse * used * per_expert + batch * context * kv) / bandwidth * 1000


def tidal_decode(llm: LLM, batch: int, context: int, tokens: int, profile: bool = False) -> float:
    reqs = [new_request(llm, text_prompt(i, context), llm.model.max_context - context - 1) for i in range(batch)]
    for r in reqs:
        llm.engine.add_request(r)
    while any(not r.history or r.pending_len > 1 for r in reqs):
        llm.engine.step()
    ms = back_to_back_ms(llm.engine, batch, tokens)
    if profile:
        print_profile(lambda: llm.engine.step(), f"decode batch {batch}", steps=3)
        if llm.engine.runner.graphs is not None:
            print(phases_report(step_phases(llm.engine), f"decode batch {batch}"), flush=True)
    for r in reqs:
        llm.engine.abort(r)
    return ms


def profile_prefill(llm: LLM, prompts: list[dict]) -> None:
    """Kernels of the first step of these prompts together (its vision encoder
    and prefill), timed on its own first, then profiled on fresh images' twins."""
    reqs = [new_request(llm, p, 1) for p in prompts]
    for r in reqs:
        llm.engine.add_request(r)
    sync()
    t0 = time.perf_counter()
    llm.engine.step()
    sync()
    positions = sum(n for _, n in llm.engine.stats.last_chunks)
    print(f"prefill step of {len(prompts)} new images: {(time.perf_counter() - t0) * 1000:.1f} ms for {positions} positions", flush=True)
    finish(llm, reqs)
    llm.engine.clear_prefix_cache()
    reqs = [new_request(llm, p, 1) for p in prompts]  # the same images, their KV dropped: encoded and prefilled again
    for r in reqs:
        llm.engine.add_request(r)
    print_profile(lambda: llm.engine.step(), f"prefill {len(prompts)} images", steps=1)
    finish(llm, reqs)
    llm.engine.clear_prefix_cache()


def print_profile(fn, label: str, steps: int) -> None:
    """GPU kernels of `steps` calls of fn (graph replays included), by total time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        sync()
    from benchmarks.timeline import profiler_kernels, timeline_report

    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
    table += "\n" + timeline_report(profiler_kernels(prof), steps)
    print(f"-- profile: {label}, {steps} steps --\n{table}", flush=True)
    if PROFILE_DIR:
        with open(os.path.join(PROFILE_DIR, f"profile-{label.replace(' ', '-')}.txt"), "w") as f:
            f.write(table)


def concurrent(llm: LLM, prompts: list[dict], out_tokens: int, steps: list[tuple[float, int, int]] | None = None) -> tuple[float, float]:
    """All prompts at once, each generating out_tokens -> (output tokens/s, seconds);
    `steps` collects each engine step (see run_to_end)."""
    sync()
    t0 = time.perf_counter()
    reqs = [new_request(llm, p, out_tokens) for p in prompts]  # image decoding and hashing counted
    run_to_end(llm, reqs, steps)
    sync()
    wall = time.perf_counter() - t0
    done = sum(r.skill.completion_tokens for r in reqs)
    assert done == len(prompts) * out_tokens, (done, len(prompts) * out_tokens)
    return done / wall, wall


def ttft_ms(llm: LLM, prompt: dict) -> float:
    sync()
    t0 = time.perf_counter()
    run_to_end(llm, [new_request(llm, prompt, 1)])
    sync()
    return (time.perf_counter() - t0) * 1000


def first_logits(llm: LLM, prompt: dict) -> torch.Tensor:
    llm.engine.config.trace_logits = True
    req = new_request(llm, prompt, 1)
    run_to_end(llm, [req])
    llm.engine.config.trace_logits = False
    return req.trace[0].logits.float().flatten().cpu()


def same_model_check(results: dict, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    results["same_model_first_logits_rel_err"] = err
    results["same_model_first_token_same"] = bool(ours.argmax() == theirs.argmax())
    print(f"same model check: tidal's first logits within {err:.2e} relative of transformers'; same token: {bool(ours.argmax() == theirs.argmax())}", flush=True)


# -- main -------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("moe", "vl"), required=True, help="moe: Qwen3-30B-A3B shapes; vl: Qwen3-VL-8B shapes")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on any device: a dry run of the script")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="decode batch sizes (default: 1 8 64; vl: 1 32 128)")
    ap.add_argument("--context", type=int, default=512, help="prompt positions of each decoding sequence")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per batch size")
    ap.add_argument("--concurrent", type=int, default=None, help="requests at once, end to end (default: 64; vl: 128)")
    ap.add_argument("--out-tokens", type=int, default=256, help="output tokens of each concurrent request")
    ap.add_argument("--image", type=int, nargs=2, default=(720, 1280), metavar=("H", "W"), help="Qwen3-VL image size")
    ap.add_argument("--hf-tokens", type=int, default=8, help="new tokens per transformers generate() timing")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-concurrent", action="store_true", help="skip the end-to-end concurrent run")
    ap.add_argument("--profile", action="store_true", help="print the GPU kernels of a few decode steps at each batch size, and (vl) of a prefill step")
    ap.add_argument("--prefill-images", type=int, default=8, help="new images in the profiled prefill step (vl, --profile)")
    ap.add_argument("--no-overlap", action="store_true", help="EngineConfig(overlap=False): each decode step launched after the last one's results are read")
    ap.add_argument("--skinny", choices=("off", "auto", "all"), default="auto", help="EngineConfig.skinny_gemm: which decode-sized projections run the Triton skinny product")
    ap.add_argument("--kv-dtype", choices=("auto", "fp8"), default="auto", help="EngineConfig.kv_dtype: the model's dtype in the KV cache, or float8 (half the K/V bytes; results differ)")
    args = ap.parse_args()
    vl = args.model == "vl"
    global PROFILE_DIR
    PROFILE_DIR = args.out if args.profile else ""
    batches = args.batches or ([1, 32, 128] if vl else [1, 8, 64])
    n_concurrent = args.concurrent or (128 if vl else 64)
    if args.tiny:
        args.image = (64, 96)
    results: dict = {
        "gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": os.environ.get("TIDAL_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shapes": ("tiny " if args.tiny else "") + ("Qwen3-VL-8B" if vl else "Qwen3-30B-A3B"),
        "skinny_gemm": args.skinny,
        "overlap": not args.no_overlap,
        "kv_dtype": args.kv_dtype,
    }
    bandwidth = copy_bandwidth()
    results["copy_bandwidth_tb_s"] = bandwidth / 1e12
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    if vl:
        text, vision = (VL_TEXT_TINY, VL_VISION_TINY) if args.tiny else (VL_TEXT, VL_VISION)
        model = build_vl(text, vision, dtype)
    else:
        shapes = MOE_TINY if args.tiny else MOE
        model = build_moe(shapes, dtype)
    results["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    most = max(batches + [n_concurrent])
    context_needed = max(args.context, 1200 if vl else 0) + args.out_tokens + 16
    cfg = EngineConfig(max_running=most, kv_pages=most * context_needed + 4096, token_budget=8192, skinny_gemm=args.skinny, overlap=False if args.no_overlap else None, kv_dtype=args.kv_dtype)
    llm = LLM(model, None, (), cfg)
    results["warmup_s"] = llm.engine.warmup_s
    print(f"built in {time.perf_counter() - t0:.1f} s; warm-up (graph capture) {llm.engine.warmup_s:.1f} s", flush=True)

    img = image(*args.image, seed=1)
    question = [(97 * j) % 30_000 + 100 for j in range(12)]
    check_prompt = {"prompt_token_ids": chat_ids(question, vl), **({"images": [img]} if vl else {})}
    ours = first_logits(llm, check_prompt)

    for b in batches:
        ms = tidal_decode(llm, b, args.context, args.tokens, args.profile)
        floor = decode_floor_ms(model, b, args.context, bandwidth, kv_bytes=llm.engine.kv_pool.k.element_size())
        results[f"tidal_decode_b{b}_ms"], results[f"tidal_decode_b{b}_tok_s"], results[f"floor_decode_b{b}_ms"] = ms, b * 1000 / ms, floor
        print(f"tidal decode batch {b}: {ms:.2f} ms/step, {b * 1000 / ms:.0f} tok/s (floor {floor:.2f} ms)", flush=True)
    if vl:
        for rep in range(3):  # new images; then the last one again, its KV cached
            ms = ttft_ms(llm, {"prompt_token_ids": chat_ids(question, True), "images": [image(*args.image, seed=100 + rep)]})
        results["tidal_ttft_new_image_ms"] = statistics.median([ttft_ms(llm, {"prompt_token_ids": chat_ids(question, True), "images": [image(*args.image, seed=200 + rep)]}) for rep in range(3)])
        results["tidal_ttft_cached_image_ms"] = statistics.median([ttft_ms(llm, {"prompt_token_ids": chat_ids(question[:-1] + [rep + 5], True), "images": [image(*args.image, seed=202)]}) for rep in range(3)])
        print(f"tidal time to first token, {args.image[1]}x{args.image[0]}: new image {results['tidal_ttft_new_image_ms']:.1f} ms, cached {results['tidal_ttft_cached_image_ms']:.1f} ms", flush=True)
        prompts = [{"prompt_token_ids": chat_ids(question, True), "images": [image(*args.image, seed=1000 + i)]} for i in range(n_concurrent)]
        if args.profile:  # one step that encodes and prefills new images (eight: as the concurrent run's prefill steps do)
            profile_prefill(llm, [{"prompt_token_ids": chat_ids(question, True), "images": [image(*args.image, seed=500 + i)]} for i in range(args.prefill_images)])
    else:
        prompts = [text_prompt(10_000 + i, args.context) for i in range(n_concurrent)]
    if not args.no_concurrent:
        replays0 = llm.engine.runner.graph_replays
        steps0, preempted0 = llm.engine.stats.steps, llm.engine.scheduler.num_preemptions
        steps: list[tuple[float, int, int]] = []
        tok_s, wall = concurrent(llm, prompts, args.out_tokens, steps)
        key = f"tidal_concurrent{n_concurrent}"
        results[f"{key}_out_tok_s"], results[f"{key}_s"] = tok_s, wall
        results[f"{key}_graph_share"] = (llm.engine.runner.graph_replays - replays0) / max(1, llm.engine.stats.steps - steps0)
        print(f"tidal {n_concurrent} concurrent requests ({'one image each, ' if vl else ''}{args.out_tokens} output tokens each): {tok_s:.0f} output tok/s, {wall:.1f} s", flush=True)
        results[f"{key}_preemptions"] = llm.engine.scheduler.num_preemptions - preempted0
        results[f"{key}_most_running"] = max((s[2] for s in steps), default=0)
        print(f"  where it went: {step_breakdown(steps, key, results)}; {results[f'{key}_preemptions']} preemptions, at most {results[f'{key}_most_running']} decoding at once", flush=True)
    if DEV.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    close_model(llm)

    if not args.no_hf:
        hf = hf_vl(model, text, vision) if vl else hf_moe(model, shapes)
        if vl:
            theirs = hf_first_logits_vl(hf, model, check_prompt["prompt_token_ids"], img)
        else:
            with torch.no_grad():
                theirs = hf(torch.tensor([check_prompt["prompt_token_ids"]], device=DEV)).logits[0, -1].float().cpu()
        same_model_check(results, ours, theirs)
        for b in batches[:2]:
            ms = hf_decode(hf, b, args.context, args.hf_tokens)
            results[f"hf_decode_b{b}_ms"], results[f"hf_decode_b{b}_tok_s"] = ms, b * 1000 / ms
            print(f"transformers generate batch {b}: {ms:.2f} ms/token, {b * 1000 / ms:.0f} tok/s", flush=True)
    variant = "".join(f"-{flag}" for flag, on in (("nooverlap", args.no_overlap), (f"skinny-{args.skinny}", args.skinny != "auto"), ("kv-fp8", args.kv_dtype == "fp8")) if on)
    report(results, args.out, f"bench-qwen3-{args.model}{variant}.json")  # a variant's run does not overwrite the default's
    print("\n" + targets.write_targets(results, targets.QWEN3_VL if vl else targets.QWEN3_MOE, args.out, f"targets-qwen3-{args.model}{variant}.md"), flush=True)


if __name__ == "__main__":
    main()
