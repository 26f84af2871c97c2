"""Paged attention, Triton backend (CUDA): the decode kernel for steps where
every sequence feeds one position, the extend kernel for everything else.
See tidal/kernels/paged_attention.py (decode) and extend_attention.py (prefill,
mixed steps) for the kernels and the mask rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidal.core import ForwardBatch, ForwardMode, h2d
from tidal.kernels.extend_attention import (
    EXTEND_BLOCK_M,
    extend_attention,
    extend_blocks,
)
from tidal.kernels.paged_attention import decode_attention


@dataclass
class DecodeMetadata:
    """Per sequence: its table row and kv_len (device tensors [B]); the kernel
    picks its splits from the shapes (decode_splits). CUDA graphs keep one of
    these over static buffers and refill it per step."""

    rows: torch.Tensor
    kv_lens: torch.Tensor


@dataclass
class ExtendMetadata:
    blocks: torch.Tensor  # int32 [NB, 6], see extend_blocks


class TritonPagedAttention:
    def prepare(self, batch: ForwardBatch) -> None:
        dev = batch.positions.device
        if batch.mode is ForwardMode.DECODE:
            batch.attn_metadata = DecodeMetadata(
                rows=h2d(batch.req_rows, torch.int64, dev),
                kv_lens=h2d(batch.kv_lens, torch.int32, dev),
            )
        else:
            blocks = extend_blocks(batch.q_lens, batch.kv_lens, batch.bidir_lens, batch.req_rows, EXTEND_BLOCK_M)
            batch.attn_metadata = ExtendMetadata(h2d(blocks, torch.int32, dev).view(-1, 6))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch) -> torch.Tensor:
        batch.kv_pool.write(layer, batch.out_cache_loc, k, v)
        return self.attend(q, layer, batch)

    def attend(self, q: torch.Tensor, layer: int, batch: ForwardBatch) -> torch.Tensor:
        pool, meta = batch.kv_pool, batch.attn_metadata
        if isinstance(meta, DecodeMetadata):
            return decode_attention(q, pool.k[layer], pool.v[layer], batch.req_to_token, meta.rows, meta.kv_lens)
        return extend_attention(q, pool.k[layer], pool.v[layer], batch.req_to_token, meta.blocks)
