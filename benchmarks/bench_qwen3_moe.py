"""Qwen3-MoE on one GPU: tidal beside transformers' `generate` on the same
weights (random bf16 of the Qwen3-30B-A3B shapes, never zeros), each decode
figure beside its floor (the bytes a step must read over the copy bandwidth
measured in the same run).

    PYTHONPATH=. python3 benchmarks/bench_qwen3_moe.py [--out DIR] [--tiny] [--batches 1 64]

transformers holds tidal's own tensors (its stacked experts have tidal's
layout: gate_up_proj = fc1, down_proj = fc2), so both fit on one 80 GB card.
Method: tidal's engine steps timed while every sequence decodes (prompts of
--context positions, generation that never stops early); transformers'
per-token time from generate() of N and of 1 new tokens. Medians. Prints a
table last; writes DIR/bench-qwen3-moe.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_moondream import _report, copy_bandwidth, sync  # noqa: E402

from tidal.engine.engine import EngineConfig  # noqa: E402
from tidal.engine.request import Request  # noqa: E402
from tidal.engine.sampling import SamplingParams  # noqa: E402
from tidal.llm import LLM  # noqa: E402
from tidal.models.qwen3_moe.config import Qwen3MoeConfig  # noqa: E402
from tidal.models.qwen3_moe.model import Qwen3MoeModel  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Qwen3-30B-A3B's config.json
REAL = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1_000_000.0, tie_word_embeddings=False,
)
TINY = REAL | dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)


def build(shapes: dict, dtype: torch.dtype) -> Qwen3MoeModel:
    cfg = Qwen3MoeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in shapes.items()})
    with torch.device("meta"):
        model = Qwen3MoeModel(cfg)
    model = model.to(dtype).to_empty(device=DEV)
    gen = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.setup_runtime(DEV)
    return model.eval().requires_grad_(False)


def hf_sharing(model: Qwen3MoeModel, shapes: dict):
    """transformers' Qwen3MoeForCausalLM over tidal's tensors (None where its experts are not stacked)."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(**shapes, mlp_only_layers=[], decoder_sparse_step=1)
    with torch.device("meta"):
        hf = transformers.Qwen3MoeForCausalLM(cfg)
    names = {n for n, _ in hf.named_parameters()}
    if not any(n.endswith("experts.gate_up_proj") for n in names):
        return None
    ours = dict(model.named_parameters())
    state = {}
    for n in names:
        key = n.removeprefix("model.")
        key = {"embed_tokens.weight": "embed_tokens"}.get(key, key)
        key = key.replace("mlp.experts.gate_up_proj", "mlp.fc1").replace("mlp.experts.down_proj", "mlp.fc2")
        state[n] = ours[key]
    hf.load_state_dict(state, strict=True, assign=True)
    with torch.device(DEV):  # its one buffer (rotary frequencies), built for real
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)
    leftover = [n for n, b in hf.named_buffers() if b.is_meta]
    assert not leftover, leftover
    return hf.eval()


def decode_floor_ms(model: Qwen3MoeModel, batch: int, context: int, bandwidth: float) -> float:
    cfg = model.config
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.endswith((".fc1", ".fc2")) and n != "embed_tokens")
    used = cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** batch)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    return (dense + cfg.num_hidden_layers * used * per_expert + batch * context * kv) / bandwidth * 1000


def tidal_decode(llm: LLM, batch: int, context: int, tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=llm.model.max_context - context - 1)
    reqs = []
    for i in range(batch):
        skill, ids = llm._prepare({"prompt_token_ids": [(7 * i + j) % 1000 + 10 for j in range(context)]}, params, ignore_eos=True)
        reqs.append(Request(skill=skill, pending=ids, bidir_len=0))
        llm.engine.add_request(reqs[-1])
    while any(not r.history or r.pending_len > 1 for r in reqs):
        llm.engine.step()
    times = []
    for _ in range(tokens):
        sync()
        t0 = time.perf_counter()
        llm.engine.step()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
        assert len(llm.engine.stats.last_chunks) == batch, "a measured step did not hold the whole batch"
    for r in reqs:
        llm.engine.abort(r)
    return statistics.median(times)


def hf_decode(hf, batch: int, context: int, tokens: int) -> float:
    ids = torch.randint(10, min(1000, hf.config.vocab_size), (batch, context), device=DEV)

    def run(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t0

    run(2)
    one, many = statistics.median(run(1) for _ in range(3)), statistics.median(run(tokens) for _ in range(2))
    return (many - one) / (tokens - 1) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on any device: a dry run of the script")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = ap.parse_args()
    shapes = TINY if args.tiny else REAL
    results: dict = {
        "gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": os.environ.get("TIDAL_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shapes": "tiny" if args.tiny else "Qwen3-30B-A3B",
    }
    bandwidth = copy_bandwidth()
    results["copy_bandwidth_tb_s"] = bandwidth / 1e12
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    model = build(shapes, dtype)
    results["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    llm = LLM(model, None, (), EngineConfig(max_running=max(args.batches), prefix_cache=False))
    for b in args.batches:
        ms = tidal_decode(llm, b, args.context, args.tokens)
        results[f"tidal_decode_b{b}_ms"], results[f"tidal_decode_b{b}_tok_s"] = ms, b * 1000 / ms
        results[f"floor_decode_b{b}_ms"] = decode_floor_ms(model, b, args.context, bandwidth)
        print(f"tidal decode batch {b}: {ms:.2f} ms/step, {b * 1000 / ms:.0f} tok/s (floor {results[f'floor_decode_b{b}_ms']:.2f} ms)", flush=True)
    llm.close()
    if not args.no_hf:
        hf = hf_sharing(model, shapes)
        if hf is None:
            print("this transformers keeps experts one module each: it cannot share tidal's tensors; skipped", flush=True)
        else:
            for b in args.batches:
                ms = hf_decode(hf, b, args.context, args.tokens)
                results[f"hf_decode_b{b}_ms"], results[f"hf_decode_b{b}_tok_s"] = ms, b * 1000 / ms
                print(f"transformers generate batch {b}: {ms:.2f} ms/token, {b * 1000 / ms:.0f} tok/s", flush=True)
    _report(results, args.out, "bench-qwen3-moe.json")

if __name__ == "__main__":
    main()
