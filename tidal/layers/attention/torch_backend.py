"""Paged attention, torch reference backend (CPU, tests, the float32 reference).

Masking rule: a query at position p sees key position j when j <= p, or when
both lie in the sequence's bidirectional prefix (j < bidir and p < bidir). A
sequence's keys are its positions 0 .. kv_len-1, in the slots its row of the
request-to-slot table names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tidal.core import ForwardBatch


@dataclass
class _SeqMeta:
    start: int  # first row of this sequence in the flat token batch
    end: int
    kv_index: torch.Tensor  # [kv_len] slots
    mask: torch.Tensor | None  # [q_len, kv_len] bool, None when every key is visible


class TorchPagedAttention:
    """Loops over sequences; gathers each one's K/V by slot and runs SDPA."""

    def prepare(self, batch: ForwardBatch) -> None:
        """Once per step: each sequence's rows, slots and mask."""
        metas: list[_SeqMeta] = []
        start = 0
        device = batch.positions.device
        for q_len, kv_len, bidir, row in zip(batch.q_lens, batch.kv_lens, batch.bidir_lens, batch.req_rows):
            end = start + q_len
            kv_index = batch.req_to_token[row, :kv_len]
            mask = None  # a single newest query sees every key
            if q_len > 1:
                q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
                k_pos = torch.arange(kv_len, device=device)[None, :]
                mask = k_pos <= q_pos
                if bidir > 0:
                    mask |= (k_pos < bidir) & (q_pos < bidir)
            metas.append(_SeqMeta(start, end, kv_index, mask))
            start = end
        batch.attn_metadata = metas

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] of this step's positions -> [T, H, D].
        Writes k/v into the cache at batch.out_cache_loc, then attends."""
        batch.kv_pool.write(layer, batch.out_cache_loc, k, v)
        return self.attend(q, layer, batch)

    def attend(self, q: torch.Tensor, layer: int, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H, D] -> [T, H, D], over K/V already in the cache."""
        pool = batch.kv_pool
        out = torch.empty_like(q)
        groups = q.shape[1] // pool.k.shape[2]
        for m in batch.attn_metadata:
            keys = pool.k[layer][m.kv_index].to(q.dtype)
            vals = pool.v[layer][m.kv_index].to(q.dtype)
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                vals = vals.repeat_interleave(groups, dim=1)
            # 4-D [1, heads, len, dim] so the fused SDPA kernels apply on CUDA
            o = F.scaled_dot_product_attention(
                q[m.start : m.end].transpose(0, 1)[None],
                keys.transpose(0, 1)[None],
                vals.transpose(0, 1)[None],
                attn_mask=m.mask,
            )
            out[m.start : m.end] = o[0].transpose(0, 1)
        return out
