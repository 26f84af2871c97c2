"""Qwen3-30B-A3B and Qwen3-VL-8B for benchmarks/bench_qwen.py: their shapes
(from the published config.json files, plus tiny variants for a CPU dry run),
tidal's models of them with random weights, and transformers' models holding
the very same tensors (views where the layouts differ), with the calls that
time them.
"""

from __future__ import annotations

import inspect
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import sync  # noqa: E402

from tidal.models.qwen3_moe.config import Qwen3MoeConfig  # noqa: E402
from tidal.models.qwen3_moe.model import Qwen3MoeModel  # noqa: E402
from tidal.models.qwen3_vl.model import Qwen3VLModel  # noqa: E402
from tidal.models.qwen3_vl.processor import ImageProcessorConfig, process_image  # noqa: E402
from tidal.models.qwen3_vl.vision import VisionConfig  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Qwen3-30B-A3B's config.json
MOE = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1_000_000.0, tie_word_embeddings=False,
)
MOE_TINY = MOE | dict(vocab_size=160_000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)
# Qwen3-VL-8B-Instruct's config.json (text_config, vision_config) and preprocessor_config.json
VL_TEXT = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=0, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_experts=0, num_experts_per_tok=0,
    max_position_embeddings=262144, rope_theta=5_000_000.0, tie_word_embeddings=False,
)
VL_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=4096, num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24))
VL_TEXT_TINY = VL_TEXT | dict(vocab_size=160_000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
VL_VISION_TINY = VL_VISION | dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, deepstack_visual_indexes=(0,))
MROPE_SECTION = (24, 20, 20)
IMAGE_TOKEN, VISION_START, VISION_END = 151655, 151652, 151653
IM_START, IM_END, NEWLINE, USER, ASSISTANT = 151644, 151645, 198, 872, 77091


# -- models -------------------------------------------------------------------------
def init_random_(model: torch.nn.Module, seed: int = 0) -> None:
    """Normal(0, 0.02) weights, norms at 1, biases small: logits that vary, never zeros."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def build_moe(shapes: dict, dtype: torch.dtype) -> Qwen3MoeModel:
    with torch.device("meta"):
        model = Qwen3MoeModel(Qwen3MoeConfig(**shapes))
    model = model.to(dtype).to_empty(device=DEV)
    init_random_(model)
    model.setup_runtime(DEV)
    return model.eval().requires_grad_(False)


def build_vl(text: dict, vision: dict, dtype: torch.dtype) -> Qwen3VLModel:
    with torch.device("meta"):
        model = Qwen3VLModel(Qwen3MoeConfig(**text), VisionConfig(**vision), ImageProcessorConfig(), IMAGE_TOKEN, MROPE_SECTION)
    model = model.to(dtype).to_empty(device=DEV)
    init_random_(model)
    model.setup_runtime(DEV)
    return model.eval().requires_grad_(False)


def _fill_meta_buffers(hf: torch.nn.Module) -> None:
    """transformers' non-weight buffers (rotary frequencies), built for real on
    the device: each module holding one is made again from its config."""
    for name, module in list(hf.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent = hf.get_submodule(name.rsplit(".", 1)[0]) if "." in name else hf
            with torch.device(DEV):
                setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=module.config))
    leftover = [n for n, b in hf.named_buffers() if b.is_meta]
    assert not leftover, leftover


def _share(hf: torch.nn.Module, ours: dict[str, torch.Tensor], key_of, inner: int) -> None:
    """Load transformers' parameters as tidal's tensors (or views of them)."""
    state = {}
    for n, p in hf.named_parameters():
        key = key_of(n)
        parts = key.split(".")
        if ".mlp.experts." in key and parts[-1] == "weight":  # one module per expert (transformers 4)
            base, e, proj = ".".join(parts[:3]), int(parts[4]), parts[5]
            fc1, fc2 = ours[f"{base}.fc1"], ours[f"{base}.fc2"]
            state[n] = {"gate_proj": fc1[e, :inner], "up_proj": fc1[e, inner:], "down_proj": fc2[e]}[proj]
        else:
            key = key.replace("mlp.experts.gate_up_proj", "mlp.fc1").replace("mlp.experts.down_proj", "mlp.fc2")
            state[n] = ours[key]
        assert tuple(state[n].shape) == tuple(p.shape), (n, state[n].shape, p.shape)
    hf.load_state_dict(state, strict=True, assign=True)
    _fill_meta_buffers(hf)


def hf_moe(model: Qwen3MoeModel, shapes: dict):
    import transformers

    cfg = transformers.Qwen3MoeConfig(**shapes, mlp_only_layers=[], decoder_sparse_step=1)
    with torch.device("meta"):
        hf = transformers.Qwen3MoeForCausalLM(cfg)

    def key_of(n: str) -> str:
        key = n.removeprefix("model.")
        return {"embed_tokens.weight": "embed_tokens"}.get(key, key)

    _share(hf, dict(model.named_parameters()), key_of, shapes["moe_intermediate_size"])
    return hf.eval()


def hf_vl(model: Qwen3VLModel, text: dict, vision: dict):
    import transformers

    text_cfg = {k: v for k, v in text.items() if k not in ("moe_intermediate_size", "num_experts", "num_experts_per_tok")}
    text_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": text["rope_theta"], "mrope_section": list(MROPE_SECTION), "mrope_interleaved": True}
    text_cfg["rope_scaling"] = {"rope_type": "default", "mrope_section": list(MROPE_SECTION), "mrope_interleaved": True}
    cfg = transformers.Qwen3VLConfig(text_config=text_cfg, vision_config=dict(vision, deepstack_visual_indexes=list(vision["deepstack_visual_indexes"])), image_token_id=IMAGE_TOKEN, video_token_id=151656)
    with torch.device("meta"):
        hf = transformers.Qwen3VLForConditionalGeneration(cfg)

    def key_of(n: str) -> str:
        key = n.removeprefix("model.")
        if key == "lm_head.weight":
            return "language_model.lm_head.weight"
        return {"language_model.embed_tokens.weight": "language_model.embed_tokens"}.get(key, key)

    _share(hf, dict(model.named_parameters()), key_of, 0)
    return hf.eval()


def hf_first_logits_vl(hf, model: Qwen3VLModel, ids: list[int], img: np.ndarray) -> torch.Tensor:
    patches, grid = process_image(torch.from_numpy(img).to(DEV), model.processor)
    n = grid[1] * grid[2] // model.processor.merge_size**2
    at = ids.index(IMAGE_TOKEN)
    expanded = ids[:at] + [IMAGE_TOKEN] * n + ids[at + 1 :]
    kwargs = {"pixel_values": patches.to(torch.bfloat16 if DEV.type == "cuda" else torch.float32), "image_grid_thw": torch.tensor([grid], device=DEV)}
    if "mm_token_type_ids" in inspect.signature(hf.model.forward).parameters:
        kwargs["mm_token_type_ids"] = torch.tensor([[int(t == IMAGE_TOKEN) for t in expanded]], device=DEV)
    with torch.no_grad():
        return hf(input_ids=torch.tensor([expanded], device=DEV), **kwargs).logits[0, -1].float().cpu()


def hf_decode(hf, batch: int, context: int, tokens: int) -> float:
    ids = torch.randint(10, 100_000 if hf.config.get_text_config().vocab_size > 100_000 else 500, (batch, context), device=DEV)

    def run(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t0

    run(2)
    one, many = statistics.median(run(1) for _ in range(3)), statistics.median(run(tokens) for _ in range(2))
    return (many - one) / (tokens - 1) * 1000
