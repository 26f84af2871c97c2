"""The Moondream 3 model: vision encoder, text decoder and region head."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from tidal.errors import CheckpointError
from tidal.runner.forward_batch import ForwardBatch

from .config import MoondreamConfig
from .processor import Crops, crops_to_tensor
from .region import RegionHead
from .text import TextModel
from .vision import VisionModel

WEIGHT_PREFIX = "model."


class Moondream3Model(nn.Module):
    """Parameter names match the official checkpoint's keys minus the `model.` prefix."""

    def __init__(self, config: MoondreamConfig, has_region_ln: bool = False) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionModel(config.vision)
        self.text = TextModel(config.text)
        self.region = RegionHead(config.region, config.text.dim, has_ln=has_region_ln)

    @property
    def device(self) -> torch.device:
        return self.text.wte.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.wte.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """-> raw hidden states [T, dim]; see TextModel.forward."""
        return self.text(input_ids, positions, forward_batch)

    @torch.inference_mode()
    def encode_image(self, crops: Crops) -> torch.Tensor:
        """Crops of one image -> image embeddings [729, text dim] in the model dtype."""
        pixels = crops_to_tensor(crops, self.device, self.dtype)
        features = self.vision.encode_crops(pixels)
        return self.vision.project(features, crops.tiling)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (keys under `model.`) into the parameters.

        Strict: a missing or unexpected key or a shape mismatch raises a
        CheckpointError that names it. Tensors are cast to the model dtype.
        """
        params = dict(self.named_parameters())
        seen: set[str] = set()
        unexpected: list[str] = []
        mismatched: list[str] = []
        for key, tensor in weights:
            name = key[len(WEIGHT_PREFIX) :] if key.startswith(WEIGHT_PREFIX) else key
            param = params.get(name)
            if param is None:
                unexpected.append(key)
                continue
            if tuple(param.shape) != tuple(tensor.shape):
                mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(param.shape)}")
                continue
            with torch.no_grad():
                param.copy_(tensor.to(device=param.device, dtype=param.dtype))
            seen.add(name)
        missing = sorted(WEIGHT_PREFIX + n for n in params if n not in seen)
        problems = []
        if missing:
            problems.append(f"missing weights ({len(missing)}): {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected weights ({len(unexpected)}): {_names(sorted(unexpected))}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {_names(mismatched)}")
        if problems:
            raise CheckpointError("checkpoint does not match the Moondream 3 architecture: " + "; ".join(problems))


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
