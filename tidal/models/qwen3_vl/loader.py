"""Building Qwen3-VL from a Hugging Face checkpoint folder."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tidal.errors import CheckpointError
from tidal.models.checkpoint import build_and_load, read_json, weight_files
from tidal.models.qwen3_moe.config import Qwen3MoeConfig

from .model import Qwen3VLModel, VideoTokens
from .processor import ImageProcessorConfig
from .video import VideoProcessorConfig
from .vision import VisionConfig

logger = logging.getLogger(__name__)


def read_configs(folder: Path) -> dict:
    raw = read_json(folder)
    text_raw = dict(raw.get("text_config") or {})
    if not text_raw:
        raise CheckpointError(f"{folder}/config.json has no text_config")
    rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
    section = tuple(int(v) for v in rope.get("mrope_section", (24, 20, 20)))
    if rope.get("mrope_interleaved") is False:
        raise CheckpointError("only interleaved M-RoPE (Qwen3-VL's) is supported")
    # the dense decoder is Qwen3-MoE's with no experts; Qwen3-VL-MoE's always renormalizes its top-k
    text_raw.setdefault("moe_intermediate_size", 0)
    text_raw.setdefault("num_experts_per_tok", 0)
    text_raw.setdefault("norm_topk_prob", True)
    text_raw["rope_parameters"] = {"rope_theta": rope.get("rope_theta", 5_000_000.0)}
    text_raw["tie_word_embeddings"] = raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False))
    processor = ImageProcessorConfig.from_folder(folder) if (folder / "preprocessor_config.json").is_file() else ImageProcessorConfig()
    return dict(
        text=Qwen3MoeConfig.from_hf(text_raw),
        vision=VisionConfig.from_hf(raw.get("vision_config") or {}),
        processor=processor,
        image_token_id=int(raw.get("image_token_id", 151655)),
        mrope_section=section,
        video=VideoTokens(
            video_token_id=int(raw.get("video_token_id", 151656)),
            vision_start_id=int(raw.get("vision_start_token_id", 151652)),
            vision_end_id=int(raw.get("vision_end_token_id", 151653)),
            processor=VideoProcessorConfig.from_folder(folder),
        ),
    )


def load_model(folder: Path, device: torch.device | str, dtype: torch.dtype) -> Qwen3VLModel:
    configs = read_configs(folder)
    files = weight_files(folder)
    model = build_and_load(lambda: Qwen3VLModel(**configs), files, device, dtype)
    model.setup_runtime(device)
    logger.info("loaded %s (%d tensors) on %s as %s", folder, len(files), device, dtype)
    return model
