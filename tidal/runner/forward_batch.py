"""The per-step batch description that the model and attention layers read."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tidal.cache.kv_pool import KVPool


class ForwardMode(Enum):
    PREFILL = "prefill"  # every sequence feeds more than one token
    DECODE = "decode"  # every sequence feeds exactly one token
    MIXED = "mixed"


@dataclass
class ForwardBatch:
    """One engine step: a ragged batch of sequences, flattened to T tokens.

    Token-level tensors (length T, sequences back to back):
        input_ids: [T] token ids (placeholders where `input_embeds` overrides).
        positions: [T] absolute positions.
        out_cache_loc: [T] KV slots that receive each token's K/V.
    Sequence-level lists (length B, on the host):
        q_lens: tokens each sequence feeds this step.
        kv_lens: cached + new tokens of each sequence after this step.
        bidir_lens: leading positions of each sequence that attend
            bidirectionally among themselves (730 with an image, else 0).
        req_rows: each sequence's row in the request-to-slot table.
    input_embeds: [T, D] embeddings to use instead of looking up input_ids.
    kv_pool, req_to_token: the paged cache; kv_pool.k[layer][slot] is a token's K.
    attn_metadata: whatever the attention backend precomputed for this batch.
    """

    mode: ForwardMode
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_cache_loc: torch.Tensor
    q_lens: list[int]
    kv_lens: list[int]
    bidir_lens: list[int]
    req_rows: list[int]
    kv_pool: "KVPool"
    req_to_token: torch.Tensor
    input_embeds: torch.Tensor | None = None
    attn_metadata: Any = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.q_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
