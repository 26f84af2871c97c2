"""The model authors' reference implementation, run beside tidal on the same weights.

The reference is public (the `moondream3/` folder of github.com/nkasmanoff/moondream-grpo);
it is fetched into the ignored folder `peers/` and never committed:

    peers/moondream3/moondream.py, text.py, vision.py, ...

Its parameters are the official checkpoint's names, as tidal's are, so the
reference shares tidal's weight tensors (no copy). Its tokenizer would be
downloaded by name; here it gets the benchmark's tokenizer instead (the device
has no network). Timing follows the reference's own loops: one
`_decode_one_tok` per token with the token read back on the host (its
generator does `.item()` each step), and `encode_image` + `_prefill_prompt`
for the first output.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "peers" / "moondream3"


def available(path: Path = DEFAULT_PATH) -> bool:
    return (path / "moondream.py").is_file()


def load(model: torch.nn.Module, tokenizer, tiny_overrides: dict | None = None, path: Path = DEFAULT_PATH):
    """The reference MoondreamModel holding `model`'s parameter tensors."""
    sys.path.insert(0, str(path.parent))
    try:
        ref_md = importlib.import_module(f"{path.name}.moondream")
        ref_cfg = importlib.import_module(f"{path.name}.config")
    finally:
        sys.path.pop(0)
    ref_md.Tokenizer = SimpleNamespace(from_pretrained=lambda *_a, **_k: tokenizer)
    if tiny_overrides:
        t = dict(tiny_overrides["text"])
        t["moe"] = ref_cfg.TextMoeConfig(**t["moe"])
        config = ref_cfg.MoondreamConfig(
            text=ref_cfg.TextConfig(**t),
            vision=ref_cfg.VisionConfig(**tiny_overrides["vision"]),
            region=ref_cfg.RegionConfig(**tiny_overrides["region"]),
        )
    else:
        config = ref_cfg.MoondreamConfig()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    with torch.device(device):
        ref = ref_md.MoondreamModel(config, dtype=dtype)
    params = dict(model.named_parameters())
    wanted = {n for n, _ in ref.named_parameters()}
    missing = wanted - params.keys()
    if missing:
        raise RuntimeError(f"the reference has parameters tidal lacks: {sorted(missing)[:8]}")
    for name in wanted:
        if tuple(params[name].shape) != tuple(ref.get_parameter(name).shape):
            raise RuntimeError(f"{name}: tidal {tuple(params[name].shape)}, reference {tuple(ref.get_parameter(name).shape)}")
    ref.load_state_dict({n: params[n] for n in wanted}, strict=False, assign=True)
    return ref.eval().requires_grad_(False)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def first_output_ms(ref, image: Image.Image, question_ids: list[int]) -> float:
    """Image to first token: crops, vision encoder, image prefill, prompt prefill, the token on the host."""
    _sync()
    t0 = time.perf_counter()
    enc = ref.encode_image(image)
    prompt = torch.tensor([[1, 15381, 2, *question_ids, 3]], device=ref.device)
    _, _, token, _ = ref._prefill_prompt(prompt, enc.pos, 0.0, 0.9)
    token.item()
    return (time.perf_counter() - t0) * 1000


def first_logits(ref, image: Image.Image, question_ids: list[int]) -> torch.Tensor:
    """The reference's logits [vocab] (float32) for the first answer token."""
    enc = ref.encode_image(image)
    prompt = torch.tensor([[1, 15381, 2, *question_ids, 3]], device=ref.device)
    logits, _, _, _ = ref._prefill_prompt(prompt, enc.pos, 0.0, 0.9)
    return logits[0].float()


def decode_ms(ref, image: Image.Image, tokens: int) -> float:
    """Median ms per greedy token at batch 1 after an image and a short prompt."""
    from_text = importlib.import_module(f"{type(ref).__module__.rsplit('.', 1)[0]}.text")
    enc = ref.encode_image(image)
    prompt = torch.tensor([[1, 15381, 2, 54, 3]], device=ref.device)
    with torch.inference_mode():
        _, _, token, pos = ref._prefill_prompt(prompt, enc.pos, 0.0, 0.9)
        mask = torch.zeros(1, 1, ref.config.text.max_context, device=ref.device, dtype=torch.bool)
        mask[:, :, :pos] = 1
        pos_ids = torch.tensor([pos], device=ref.device, dtype=torch.long)
        times = []
        for _ in range(tokens):
            t0 = time.perf_counter()
            emb = from_text.text_encoder(token, ref.text)
            mask[:, :, pos], pos_ids[0] = 1, pos
            logits, _ = ref._decode_one_tok(emb, mask, pos_ids, None)
            token = torch.argmax(logits, dim=-1).unsqueeze(1)
            token.item()
            pos += 1
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[len(times) // 4 :])


def measure(ref, images: dict[str, Image.Image], results: dict, label: str, tokens: int, reps: int) -> None:
    """decode batch 1 and first output for each image into results[f"{label}_..."]."""
    results[f"{label}_decode_b1_ms"] = decode_ms(ref, images["378"], tokens)
    print(f"{label} decode batch 1: {results[f'{label}_decode_b1_ms']:.2f} ms/token", flush=True)
    for name, img in images.items():
        first_output_ms(ref, img, [54])  # warm (and, compiled, the shapes)
        results[f"{label}_ttft_{name}_ms"] = statistics.median(first_output_ms(ref, img, [54, 60 + i]) for i in range(reps))
        print(f"{label} first output {name}: {results[f'{label}_ttft_{name}_ms']:.1f} ms", flush=True)


def compile_(ref) -> float:
    """The reference's own compile(): vision encoder and decode step under
    torch.compile (decode with CUDA graphs); -> seconds it took, warm-up included."""
    # Its decode step asks torch._dynamo.is_dynamo_supported() on every call,
    # which newer torch refuses to trace under fullgraph=True; the answer
    # cannot change mid-run, so it is fixed once here (the only shim).
    supported = ref._is_flex_attention_supported()
    ref._is_flex_attention_supported = lambda: supported
    t0 = time.perf_counter()
    ref.compile()
    _sync()
    return time.perf_counter() - t0
