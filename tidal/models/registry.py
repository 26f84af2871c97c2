"""Which model class serves a checkpoint: an explicit table keyed by
config.json's `architectures` (no guessing from names or shapes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tidal.errors import CheckpointError
from tidal.models.checkpoint import read_json


def _moondream3(folder: Path, device: torch.device, dtype: torch.dtype):
    from tidal.models.moondream3.weights import load_model

    return load_model(folder, device, dtype)


def _qwen3_moe(folder: Path, device: torch.device, dtype: torch.dtype):
    from tidal.models.qwen3_moe.loader import load_model

    return load_model(folder, device, dtype)


def _qwen3(folder: Path, device: torch.device, dtype: torch.dtype):
    from tidal.models.qwen3_moe.loader import load_model

    return load_model(folder, device, dtype, dense=True)


def _qwen3_vl(folder: Path, device: torch.device, dtype: torch.dtype):
    from tidal.models.qwen3_vl.loader import load_model

    return load_model(folder, device, dtype)


ARCHITECTURES: dict[str, Callable] = {
    "HfMoondream": _moondream3,
    "Qwen3ForCausalLM": _qwen3,  # dense Qwen3: the same decoder with no sparse blocks
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "Qwen3VLForConditionalGeneration": _qwen3_vl,
    "Qwen3VLMoeForConditionalGeneration": _qwen3_vl,  # the same model with Qwen3-MoE's sparse blocks
}


def architecture(folder: Path) -> str:
    """The checkpoint's architecture, if tidal supports it; else CheckpointError naming those it does."""
    names = read_json(folder).get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name
    raise CheckpointError(f"{folder}: architectures {names} are not supported; tidal runs {', '.join(sorted(ARCHITECTURES))}")


def load_model(folder: Path, device: torch.device, dtype: torch.dtype):
    """Build the checkpoint's model (strict weights) on `device` in `dtype`."""
    return ARCHITECTURES[architecture(folder)](folder, device, dtype)
