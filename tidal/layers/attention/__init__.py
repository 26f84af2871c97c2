"""Attention backends over the paged KV cache. The runner owns one, prepares its
metadata once per step and hands it to the layers through ForwardBatch.attn.

A backend has:
    prepare(batch): build this step's metadata (device tensors) on batch.attn_metadata.
    forward(q, k, v, layer, batch): write k/v [T, Hkv, D] at batch.out_cache_loc,
        then attend; q [T, H, D] -> [T, H, D].
    attend(q, layer, batch): attend over K/V already written (for fused
        kernels that write the cache themselves).
"""

from __future__ import annotations

from tidal.layers.attention.torch_backend import TorchPagedAttention

__all__ = ["TorchPagedAttention", "kernels_support", "make_backend"]


def kernels_support(head_dim: int) -> bool:
    """Whether the Triton attention kernels take this head size (a power of two,
    at least 16: their smallest matrix-product tile)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def make_backend(kernels: bool):
    """The Triton backend (CUDA, or Triton's interpreter in tests), else the torch reference."""
    if kernels:
        from tidal.layers.attention.triton_backend import TritonPagedAttention

        return TritonPagedAttention()
    return TorchPagedAttention()
