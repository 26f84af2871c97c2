"""Moondream 3 on one GPU: correctness checks at real width, then timings at full size.

Random bf16 weights of the real shapes (never zeros); fixed output lengths;
CUDA-synchronized wall clock around whole engine steps (each step ends in its
one device-to-host read); medians over repeats after warm-up.

    PYTHONPATH=. python3 benchmarks/bench_moondream.py [--out DIR] [--quick]

Prints a table last; writes the numbers as JSON to DIR/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import warnings
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import torch
from PIL import Image

from tidal.api import Moondream
from tidal.core import ImageRef, OutputSpec, StepResult
from tidal.engine.engine import EngineConfig
from tidal.engine.request import Request
from tidal.engine.skill import Skill
from tidal.images import image_key
from tidal.layers.moe import _moe_grouped, _moe_loop, route
from tidal.models.moondream3.config import MoondreamConfig
from tidal.models.moondream3.model import Moondream3Model
from tidal.models.moondream3.processor import overlap_crops
from tidal.models.moondream3.skills import LocateSkill
from tidal.models.moondream3.tiny import build_tokenizer, init_random_

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = MoondreamConfig()  # --tiny swaps in the embedded tiny shapes for a CPU dry run


# -- helpers ---------------------------------------------------------------------
class FixedLength(Skill):
    """Greedy text of exactly n tokens (never stops early), for fixed-length timing."""

    name = "fixed"

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.steps = n, 0

    def next_output(self) -> OutputSpec:
        return OutputSpec(temperature=0.0)

    def on_output(self, out: StepResult) -> list | None:
        self.steps += 1
        return None if self.steps >= self.n else [out.token]

    def result(self) -> dict:
        return {"steps": self.steps}


class ForcedObjects(LocateSkill):
    """Detect that always finds max_objects boxes (random weights may say eos at once)."""

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


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


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


def run_to_end(md: Moondream, req: Request) -> None:
    md.engine.add_request(req)
    while not req.finished:
        md.engine.step()


# -- correctness at real width ----------------------------------------------------------
def check_correctness(results: dict) -> None:
    cfg = FULL
    small = replace(cfg, text=replace(cfg.text, n_layers=max(cfg.text.n_layers, 6)), vision=replace(cfg.vision, enc_n_layers=3))
    ref = build(small, torch.float32, seed=1)
    fast = build(small, torch.bfloat16, seed=1)
    with torch.no_grad():
        for p32, p16 in zip(ref.parameters(), fast.parameters()):
            p16.copy_(p32)  # same weights, rounded to bf16
    tok = build_tokenizer(cfg.text.vocab_size)
    md32, md16 = Moondream(ref, tok), Moondream(fast, tok)
    img = image(800, 600, 0)
    e32, e16 = md32.encode_image(img), md16.encode_image(img)
    results["embeds_rel_err_bf16"] = rel(e16.embeds, e32.embeds)
    h = [md.submit_query(e, "what is in the picture", settings={"temperature": 0, "max_tokens": 8}) for md, e in ((md32, e32), (md16, e16))]
    for x in h:
        x.wait()
    results["greedy_tokens_bf16_equal_fp32"] = h[0].request.skill.answer.tokens == h[1].request.skill.answer.tokens
    md32.close()
    md16.close()

    # MoE: grouped GEMMs vs the per-expert loop, real expert shapes, bf16
    moe = fast.text.blocks[-1].mlp
    x = torch.randn(300, cfg.text.dim, device=DEV, dtype=torch.bfloat16)
    w, ids = route(x, moe.router.weight, moe.router.bias, moe.top_k)
    loop = _moe_loop(x.float(), w.float(), ids, moe.fc1.weight.float(), moe.fc2.weight.float())  # same routing, fp32
    if DEV.type == "cuda":
        results["moe_grouped_rel_err"] = rel(_moe_grouped(x, w, ids, moe.fc1.weight, moe.fc2.weight), loop)
    del ref, fast
    torch.cuda.empty_cache()


def count_syncs(md: Moondream) -> int:
    """Synchronizing CUDA calls in one batch-1 decode step (-1 off CUDA)."""
    if DEV.type != "cuda":
        return -1
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


# -- timings at full size --------------------------------------------------------------
def bench(results: dict, quick: bool) -> None:
    t0 = time.perf_counter()
    model = build(FULL, torch.bfloat16)
    sync()
    results["build_s"] = time.perf_counter() - t0
    results["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    tok = build_tokenizer(model.config.text.vocab_size)
    md = Moondream(model, tok, EngineConfig(prefix_cache=False, max_running=64))
    vcfg = model.config.vision
    t0 = time.perf_counter()
    md.caption(image(640, 480, 1), "short", settings={"temperature": 0, "max_tokens": 4})
    results["first_request_s"] = time.perf_counter() - t0
    results["syncs_per_decode_step"] = count_syncs(md)

    def first_output(img: Image.Image) -> None:
        crops = overlap_crops(img, vcfg)
        ref = ImageRef(crops, image_key(img), vcfg.n_image_tokens)
        run_to_end(md, Request(skill=FixedLength(1), pending=[0, ref, 1, 15381, 2, 54, 3], bidir_len=730))

    reps = 3 if quick else 7
    for name, (w, h) in {"378": (378, 378), "1080p": (1920, 1080)}.items():
        img = image(w, h, 2)
        results[f"encode_prefill_{name}_ms"] = statistics.median(timed(lambda: first_output(img), reps))
        results[f"crops_{name}_ms"] = statistics.median(timed(lambda: overlap_crops(img, vcfg), reps))

    for batch in (1, 8, 32) if quick else (1, 8, 32, 64):
        n_tokens = 32
        reqs = [Request(skill=FixedLength(n_tokens + 1), pending=[0] + list(range(10, 10 + 100)), bidir_len=0) for _ in range(batch)]
        for r in reqs:
            md.engine.add_request(r)
        while any(not r.history or r.pending_len > 1 for r in reqs):
            md.engine.step()  # the prefills
        steps = []
        while md.engine.has_work():
            sync()
            t = time.perf_counter()
            md.engine.step()
            steps.append((time.perf_counter() - t) * 1000)
        ms = statistics.median(steps)
        results[f"decode_b{batch}_ms_per_step"] = ms
        results[f"decode_b{batch}_tok_per_s"] = batch * 1000 / ms

    enc = md.encode_image(image(800, 600, 3))

    def detect10() -> None:
        items, bidir = md.prompts.locate(md._image_item(enc), "car", "detect")
        run_to_end(md, Request(skill=ForcedObjects(model.config.tokenizer, 10, True), pending=items, bidir_len=bidir))

    results["detect_10_objects_ms"] = statistics.median(timed(detect10, reps))
    md.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run of the script itself")
    args = ap.parse_args()
    global FULL
    if args.tiny:
        from tidal.models.moondream3.tiny import TINY_OVERRIDES

        FULL = MoondreamConfig.from_dict(TINY_OVERRIDES)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    commit = git or os.environ.get("TIDAL_COMMIT", "unknown")  # the device copy has no .git
    results: dict = {"gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", "torch": torch.__version__, "commit": commit, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    check_correctness(results)
    bench(results, args.quick)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n| measure | value |\n| --- | --- |")
    for k, v in results.items():
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")


if __name__ == "__main__":
    main()
