"""Finding, reading and loading Moondream 3 checkpoints in the official Hugging Face layout.

Layout: `config.json` whose `"config"` object overrides the default
architecture; weights in `model.safetensors`, or shards listed by
`model.safetensors.index.json`; every key under `model.`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tidal.models.checkpoint import build_and_load, read_json, weight_files

from .config import MoondreamConfig
from .model import Moondream3Model

logger = logging.getLogger(__name__)


def read_config(folder: Path) -> MoondreamConfig:
    return MoondreamConfig.from_dict(read_json(folder).get("config", {}))


def load_model(folder: Path, device: torch.device | str, dtype: torch.dtype) -> Moondream3Model:
    """Build Moondream 3 from a checkpoint folder on `device` in `dtype` (strict)."""
    config = read_config(folder)
    files = weight_files(folder)
    has_region_ln = any(k.startswith("model.region.ln.") for k in files)
    model = build_and_load(lambda: Moondream3Model(config, has_region_ln=has_region_ln), files, device, dtype)
    model.text.setup_runtime(device)
    logger.info("loaded %s (%d tensors) on %s as %s", folder, len(files), device, dtype)
    return model
