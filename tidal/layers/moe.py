"""Mixture-of-experts MLP, torch reference.

Routing: top-k over the router logits, softmax over those k (in float32).
Expert e: h, g = split(x @ fc1[e].T); y = (gelu_exact(h) * (g + 1)) @ fc2[e].T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Below this many (token, expert) pairs, gather each pair's weights and run
# one batched matmul (no host sync); above it, loop over the experts in use.
_GATHER_LIMIT = 16


def route(x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor | None, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] -> (weights [T, k] in x.dtype, expert ids [T, k])."""
    logits = F.linear(x, router_w, router_b)
    top_logits, top_ids = torch.topk(logits, top_k, dim=-1)
    weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32).to(x.dtype)
    return weights, top_ids


def _expert_act(h: torch.Tensor) -> torch.Tensor:
    a, g = h.chunk(2, dim=-1)
    return F.gelu(a) * (g + 1)


def moe_forward(
    x: torch.Tensor,
    router_w: torch.Tensor,
    router_b: torch.Tensor | None,
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """x [T, D]; fc1 [E, 2I, D]; fc2 [E, D, I] -> [T, D]."""
    weights, ids = route(x, router_w, router_b, top_k)
    return experts(x, weights, ids, fc1, fc2)


def experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's routed experts: ids/weights [T, k] -> [T, D]."""
    if grouped_mm_supported(x, fc1):
        return _moe_grouped(x, weights, ids, fc1, fc2)
    if ids.numel() <= _GATHER_LIMIT:
        return _moe_gather(x, weights, ids, fc1, fc2)
    return _moe_loop(x, weights, ids, fc1, fc2)


def _moe_gather(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """Few tokens: gather each (token, expert) pair's weights, one batched matmul."""
    n_tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    xk = x.repeat_interleave(top_k, dim=0)  # [T*k, D]
    h = torch.bmm(fc1[flat], xk[:, :, None]).squeeze(-1)
    y = torch.bmm(fc2[flat], _expert_act(h)[:, :, None]).squeeze(-1)
    return (y.view(n_tokens, top_k, -1) * weights[..., None]).sum(dim=1)


def _moe_loop(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """The reference: one matmul pair per expert in use (syncs on the device)."""
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = x[tok] @ fc1[e].T
        y = (_expert_act(h) @ fc2[e].T) * weights[tok, slot, None]
        out.index_add_(0, tok, y)
    return out


def grouped_mm_supported(x: torch.Tensor, fc1: torch.Tensor) -> bool:
    """torch._grouped_mm: bf16 on Hopper or newer, dims in multiples of 16."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    return all(d % 16 == 0 for d in fc1.shape[1:])


def _moe_grouped(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """All experts in two grouped GEMMs over tokens sorted by expert; no host sync."""
    top_k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    counts = torch.zeros(fc1.shape[0], dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts, 0).to(torch.int32)  # (bincount would sync to size its output)
    h = torch._grouped_mm(x[token], fc1.transpose(1, 2), offs=offsets)
    y = torch._grouped_mm(_expert_act(h), fc2.transpose(1, 2), offs=offsets)
    y = y * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, y)
