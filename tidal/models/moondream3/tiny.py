"""A tiny random-weight Moondream 3 checkpoint in the official layout, with a
word-level test tokenizer: the embedded default model for the demo and tests.

Built deterministically from a seed, written once to a cache folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel

from .config import MoondreamConfig
from .model import WEIGHT_PREFIX, Moondream3Model

TINY_NAME = "moondream3-tiny-random-v1"
TINY_OVERRIDES = {
    "text": {
        "dim": 128,
        "ff_dim": 256,
        "n_layers": 3,
        "n_heads": 2,
        "n_kv_heads": 2,
        "moe": {"num_experts": 8, "start_layer": 1, "experts_per_token": 2, "expert_inner_dim": 64},
    },
    "vision": {"enc_dim": 64, "enc_n_layers": 4, "enc_ff_dim": 128, "enc_n_heads": 2, "proj_out_dim": 128, "proj_inner_dim": 256},
    "region": {"dim": 128},
}
SPECIAL_TOKENS = ["<|endoftext|>"] + [f"<|md_reserved_{i}|>" for i in range(9)]
UNK = "<|unk|>"
WORDS = (
    "a an the is are was of in on at to and or what where how many which who color red green blue yellow "
    "black white gray dog cat car person people tree sky road house window door table chair cup bottle this "
    "that image picture photo describe there any one two three four five left right top bottom small large "
    "sun cloud grass water bird boat sign light wall roof wheel street field hill"
).split()


def default_cache_dir() -> Path:
    root = os.environ.get("TIDAL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "tidal")
    return Path(root).expanduser()


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Word-level: ids 0-9 special, then an unknown-word token, English words,
    and fillers `w<id>`; decoding joins words with spaces, dropping specials."""
    words = SPECIAL_TOKENS + [UNK] + WORDS
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


@torch.no_grad()
def init_random_(model: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter in place: N(0, 0.02) matrices, unit LayerNorms,
    zero biases, N(0, 1) tau alphas and N(0, 4) Fourier frequencies (a few
    cycles over [0, 1]). Works on any device; never zeros."""
    gens: dict[torch.device, torch.Generator] = {}
    for mod_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            if isinstance(module, nn.LayerNorm):
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            else:
                scale = 1.0 if name.endswith("tau.alpha") else 4.0 if name.endswith(("coord_features", "size_features")) else 0.02
                gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
                p.copy_(torch.randn(p.shape, generator=gen, device=p.device).mul_(scale).to(p.dtype))
    return model


def random_state_dict(config: MoondreamConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of the right shapes (see init_random_), as bf16 checkpoint tensors."""
    with torch.device("meta"):
        model = Moondream3Model(config)
    init_random_(model.to_empty(device="cpu"), seed)
    return {WEIGHT_PREFIX + n: p.detach().to(torch.bfloat16).contiguous() for n, p in model.named_parameters()}


def ensure_tiny_checkpoint(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """Return the tiny checkpoint folder, building it on first use."""
    folder = (cache_dir or default_cache_dir()) / TINY_NAME
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    config = MoondreamConfig.from_dict(TINY_OVERRIDES)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        (tmp / "config.json").write_text(
            json.dumps({"architectures": ["HfMoondream"], "model_type": "moondream1", "torch_dtype": "bfloat16", "config": TINY_OVERRIDES}, indent=2)
        )
        save_file(random_state_dict(config, seed), str(tmp / "model.safetensors"))
        build_tokenizer(config.text.vocab_size).save(str(tmp / "tokenizer.json"))
        try:
            tmp.rename(folder)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
