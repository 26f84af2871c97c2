"""Moondream 3 architecture configuration.

Defaults are the published Moondream 3 (Preview) model. A checkpoint's
`config.json` carries a `"config"` object whose nested keys override them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 64
    start_layer: int = 4
    experts_per_token: int = 8
    expert_inner_dim: int = 1024


@dataclass(frozen=True)
class TextConfig:
    dim: int = 2048
    ff_dim: int = 8192
    n_layers: int = 24
    vocab_size: int = 51200
    max_context: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 32
    prefix_attn: int = 730
    rope_theta: float = 1_500_000.0
    group_size: int | None = None
    moe: MoEConfig | None = field(default_factory=MoEConfig)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head: the reference uses dim // (2 * n_heads) = 32 of 64."""
        return self.dim // (2 * self.n_heads)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe.start_layer


@dataclass(frozen=True)
class VisionConfig:
    enc_dim: int = 1152
    enc_patch_size: int = 14
    enc_n_layers: int = 27
    enc_ff_dim: int = 4304
    enc_n_heads: int = 16
    proj_out_dim: int = 2048
    crop_size: int = 378
    in_channels: int = 3
    max_crops: int = 12
    overlap_margin: int = 4
    proj_inner_dim: int = 8192

    @property
    def grid(self) -> int:
        """Patches per crop side (27); also the pooled grid of the image features."""
        return self.crop_size // self.enc_patch_size

    @property
    def n_image_tokens(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class RegionConfig:
    dim: int = 2048
    coord_feat_dim: int = 256
    coord_out_dim: int = 1024
    size_feat_dim: int = 512
    size_out_dim: int = 2048
    inner_dim: int = 8192
    group_size: int | None = None


def _default_templates() -> dict[str, dict[str, Any]]:
    return {
        "caption": {
            "short": [1, 32708, 2, 12492, 3],
            "normal": [1, 32708, 2, 6382, 3],
            "long": [1, 32708, 2, 4059, 3],
        },
        "query": {"prefix": [1, 15381, 2], "suffix": [3]},
        "detect": {"prefix": [1, 7235, 476, 2], "suffix": [3]},
        "point": {"prefix": [1, 2581, 2], "suffix": [3]},
    }


@dataclass(frozen=True)
class TokenizerConfig:
    bos_id: int = 0
    eos_id: int = 0
    answer_id: int = 3
    thinking_id: int = 4
    coord_id: int = 5
    size_id: int = 6
    start_ground_points_id: int = 7
    end_ground_id: int = 9
    templates: dict[str, Any] = field(default_factory=_default_templates)


@dataclass(frozen=True)
class MoondreamConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    @classmethod
    def from_dict(cls, overrides: dict[str, Any] | None) -> "MoondreamConfig":
        """Build a config from the `"config"` object of a checkpoint's config.json."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - {"text", "vision", "region", "tokenizer"}
        if unknown:
            logger.warning("ignoring unknown config sections: %s", sorted(unknown))
        text = dict(overrides.get("text") or {})
        moe: MoEConfig | None
        if "moe" in text and text["moe"] is None:
            moe = None
        else:
            moe = _build(MoEConfig, text.get("moe") or {}, "text.moe")
        text["moe"] = moe
        return cls(
            text=_build(TextConfig, text, "text"),
            vision=_build(VisionConfig, overrides.get("vision") or {}, "vision"),
            region=_build(RegionConfig, overrides.get("region") or {}, "region"),
            tokenizer=_build(TokenizerConfig, overrides.get("tokenizer") or {}, "tokenizer"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(kind: type, values: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        logger.warning("ignoring unknown keys in config.%s: %s", where, sorted(unknown))
    return kind(**{k: v for k, v in values.items() if k in names})
