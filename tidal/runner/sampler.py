"""The batched sampler.

Randomness is a counter-based hash of (seed, step, token id), so a seeded
request samples the same tokens whatever else shares its batch, with no
per-request generator objects.
"""

from __future__ import annotations

import torch

from tidal.core import h2d

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x045D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x045D9F3B) & _M32
    return x ^ (x >> 16)


def hashed_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform noise in (0, 1), [N, vocab] float32, a pure function of (seed, step, id)."""
    key = _mix32((seeds & _M32) ^ _mix32((seeds >> 32) & _M32))
    key = _mix32(key ^ ((steps * 0x2545F491) & _M32))
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _mix32(key[:, None] ^ ((ids[None, :] * 0x27D4EB2F) & _M32))
    return (bits.to(torch.float64) + 0.5).div_(2.0**32).to(torch.float32)


def filter_top_p_top_k(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Zero the tokens outside each row's nucleus and top-k, then renormalize.

    A token is cut when the probability mass strictly before it exceeds top_p,
    or its rank is >= top_k (top_k 0 keeps all).
    """
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p
    cut = before > top_p[:, None]
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    cut |= (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    sorted_p = sorted_p.masked_fill(cut, 0.0)
    sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def sample(
    logits: torch.Tensor,
    temperature: list[float],
    top_p: list[float],
    top_k: list[int],
    seeds: list[int],
    steps: list[int],
) -> torch.Tensor:
    """logits [N, V] float32 (banned ids already -inf) -> token ids [N] (on device).

    Per-row parameters come from the host, so this never waits on the device.
    Rows with temperature 0 take the argmax. Others draw from the filtered
    softmax(logits / T) by the exponential race: argmax(p / E), E ~ Exp(1).
    """
    out = logits.argmax(dim=-1)
    hot = [i for i, t in enumerate(temperature) if t > 0]
    if not hot:
        return out
    dev = logits.device

    def pick(values: list, dtype: torch.dtype) -> torch.Tensor:
        return h2d([values[i] for i in hot], dtype, dev)

    rows = h2d(hot, torch.int64, dev)
    out[rows] = sample_rows(logits[rows], pick(temperature, torch.float32), pick(top_p, torch.float32), pick(top_k, torch.int64), pick(seeds, torch.int64), pick(steps, torch.int64))
    return out


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Draw one token per row, every row sampled; parameters are device tensors
    [N] (so CUDA graphs can capture it). Temperatures must be > 0."""
    # Shift by the row max before dividing: a tiny temperature then sends the
    # others to -inf (greedy in the limit) instead of overflowing to inf - inf.
    temps = temperature.clamp_min(torch.finfo(torch.float32).tiny)  # 1e-300 is 0 in float32
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temps[:, None]
    probs = filter_top_p_top_k(torch.softmax(scaled, dim=-1), top_p, top_k)
    noise = hashed_uniform(seeds, steps, logits.shape[-1])
    return (probs / -torch.log(noise)).argmax(dim=-1)
