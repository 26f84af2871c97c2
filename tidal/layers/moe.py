"""Mixture-of-experts MLP: routing, and the torch reference of the experts
(the CUDA fast path, moe_parts, runs tidal.kernels' routing and fused experts).

Routing: top-k over the router logits; the k weights are a softmax over those
k (in float32), or with renormalize=False the softmax over all experts at
those k (Qwen3's norm_topk_prob=False).
Expert e: h, g = split(x @ fc1[e].T); y = act(h, g) @ fc2[e].T with act
"geglu_plus1" = gelu_exact(h) * (g + 1) (Moondream 3) or "swiglu" =
silu(h) * g (Qwen3: fc1 holds gate_proj then up_proj).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidal.layers.linear import linear

# Below this many (token, expert) pairs, gather each pair's weights and run
# one batched matmul (no host sync); above it, loop over the experts in use.
_GATHER_LIMIT = 16


ACTIVATIONS = ("geglu_plus1", "swiglu")


def route(x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor | None, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] -> (weights [T, k] in x.dtype, expert ids [T, k])."""
    return _weights(F.linear(x, router_w, router_b), top_k, renormalize, x.dtype)


def _weights(logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    top_logits, top_ids = torch.topk(logits, top_k, dim=-1)
    if renormalize:
        weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
    else:
        weights = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, top_ids)
    return weights.to(dtype), top_ids


def _expert_act(h: torch.Tensor, act: str = "geglu_plus1") -> torch.Tensor:
    a, g = h.chunk(2, dim=-1)
    if act == "swiglu":
        return F.silu(a) * g
    return F.gelu(a) * (g + 1)


def moe_forward(
    x: torch.Tensor,
    router_w: torch.Tensor,
    router_b: torch.Tensor | None,
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    top_k: int,
    act: str = "geglu_plus1",
    renormalize: bool = True,
) -> torch.Tensor:
    """x [T, D]; fc1 [E, 2I, D]; fc2 [E, D, I] -> [T, D], the torch reference
    (the fast path is moe_parts)."""
    weights, ids = route(x, router_w, router_b, top_k, renormalize)
    return experts(x, weights, ids, fc1, fc2, act)


def moe_parts(
    x: torch.Tensor,
    router_w: torch.Tensor,
    router_b: torch.Tensor | None,
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    top_k: int,
    act: str = "geglu_plus1",
    renormalize: bool = True,
) -> torch.Tensor:
    """The fast path's MoE, before the sum over the k experts (which the
    residual kernel does): x [T, D] -> each token's k weighted expert outputs
    [T, k, D]. Routing and alignment take one launch at decode sizes (or,
    for one token with moe_route.ROUTE_IN_UP, happen in the up kernel)."""
    from tidal.kernels import moe_route
    from tidal.kernels.fused_moe import align_by_expert, expert_pairs, moe_config
    from tidal.kernels.moe_route import MAX_TOKENS, route_and_align

    tokens = x.shape[0]
    config = moe_config(tokens, (fc1.shape[0], fc1.shape[2], fc2.shape[2], top_k), x.dtype, x.device)
    pow2 = all(n & (n - 1) == 0 for n in (fc1.shape[0], top_k))  # what the routing kernel takes
    fused_router = moe_route.FUSED_ROUTER and pow2 and 0 < tokens <= moe_route.ROUTER_MAX_TOKENS and x.stride(-1) == 1
    if fused_router and tokens == 1 and moe_route.ROUTE_IN_UP:  # the up kernel routes the token from the router's partials
        weights, ids, pairs, block_expert, route = moe_route.router_for_up(x, router_w, router_b, top_k, config[0], renormalize)
        return expert_pairs(x, weights, fc1, fc2, top_k, pairs, block_expert, config, act, route).view(tokens, top_k, -1)
    if fused_router:
        weights, ids, pairs, block_expert = moe_route.router_route_and_align(x, router_w, router_b, top_k, config[0], renormalize)
    elif tokens <= MAX_TOKENS and pow2:
        weights, ids, pairs, block_expert = route_and_align(linear(x, router_w, router_b), top_k, config[0], x.dtype, renormalize)
    else:
        weights, ids = _weights(linear(x, router_w, router_b), top_k, renormalize, x.dtype)
        pairs, block_expert = align_by_expert(ids, fc1.shape[0], config[0])
    return expert_pairs(x, weights, fc1, fc2, top_k, pairs, block_expert, config, act).view(tokens, top_k, -1)


def experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, act: str = "geglu_plus1") -> torch.Tensor:
    """Weighted sum of each token's routed experts, torch reference: ids/weights [T, k] -> [T, D]."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown expert activation {act!r}; one of {ACTIVATIONS}")
    if ids.numel() <= _GATHER_LIMIT:
        return _moe_gather(x, weights, ids, fc1, fc2, act)
    return _moe_loop(x, weights, ids, fc1, fc2, act)


def _moe_gather(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, act: str) -> torch.Tensor:
    """Few tokens: gather each (token, expert) pair's weights, one batched matmul."""
    n_tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    xk = x.repeat_interleave(top_k, dim=0)  # [T*k, D]
    h = torch.bmm(fc1[flat], xk[:, :, None]).squeeze(-1)
    y = torch.bmm(fc2[flat], _expert_act(h, act)[:, :, None]).squeeze(-1)
    return (y.view(n_tokens, top_k, -1) * weights[..., None]).sum(dim=1)


def _moe_loop(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, act: str) -> torch.Tensor:
    """The reference: one matmul pair per expert in use (syncs on the device)."""
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = x[tok] @ fc1[e].T
        y = (_expert_act(h, act) @ fc2[e].T) * weights[tok, slot, None]
        out.index_add_(0, tok, y)
    return out
