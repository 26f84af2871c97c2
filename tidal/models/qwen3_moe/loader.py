"""Building Qwen3-MoE from a Hugging Face checkpoint folder."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tidal.errors import CheckpointError
from tidal.models.checkpoint import build_and_load, read_json, weight_files

from .config import Qwen3MoeConfig
from .model import Qwen3MoeModel

logger = logging.getLogger(__name__)


def load_model(folder: Path, device: torch.device | str, dtype: torch.dtype, dense: bool = False) -> Qwen3MoeModel:
    """config.json + safetensors (one file or shards) -> the model on `device`
    in `dtype` (strict). dense: a Qwen3 (`Qwen3ForCausalLM`) checkpoint, the
    same decoder with a dense MLP in every layer."""
    raw = read_json(folder)
    if dense:
        if raw.get("use_sliding_window"):
            raise CheckpointError("sliding-window attention (use_sliding_window) is not supported")
        raw = {**raw, "num_experts": 0, "moe_intermediate_size": 0, "num_experts_per_tok": 0}
    config = Qwen3MoeConfig.from_hf(raw)
    files = weight_files(folder)
    model = build_and_load(lambda: Qwen3MoeModel(config), files, device, dtype)
    model.setup_runtime(device)
    logger.info("loaded %s (%d tensors) on %s as %s", folder, len(files), device, dtype)
    return model
