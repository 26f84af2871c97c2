"""Qwen3-MoE's architecture, read from a Hugging Face `config.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tidal.errors import CheckpointError


@dataclass(frozen=True)
class Qwen3MoeConfig:
    """The fields tidal uses (names as in transformers' Qwen3MoeConfig)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = field(default=())

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and self.num_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> Qwen3MoeConfig:
        """From config.json (transformers 4.x and 5.x spellings both)."""
        try:
            rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
            if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
                raise CheckpointError(f"rope scaling {rope!r} is not supported yet")
            eos = raw.get("eos_token_id")
            heads = int(raw["num_attention_heads"])
            return cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]),
                moe_intermediate_size=int(raw["moe_intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads", heads)),
                head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
                num_experts=int(raw.get("num_experts", raw.get("num_local_experts", 0))),
                num_experts_per_tok=int(raw["num_experts_per_tok"]),
                norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
                decoder_sparse_step=int(raw.get("decoder_sparse_step", 1)),
                mlp_only_layers=tuple(int(i) for i in raw.get("mlp_only_layers") or ()),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 1_000_000.0))),
                max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
                attention_bias=bool(raw.get("attention_bias", False)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks {exc.args[0]!r}, which Qwen3-MoE needs") from None
