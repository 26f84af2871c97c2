"""Moondream 3 text decoder over the paged KV cache.

Each block is parallel: x = x + attn(ln(x)) + mlp(ln(x)), one LayerNorm shared
by both branches. Attention scales q and v by learned per-token, per-head
"tau" factors before rotary; MLPs are dense in the first layers and MoE after.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from tidal.core import ForwardBatch
from tidal.kernels import triton_available
from tidal.layers.linear import linear
from tidal.layers.moe import moe_forward, moe_parts
from tidal.layers.rotary import PartialRotary

from .config import TextConfig
from .vision import MLP

if triton_available():
    from tidal.kernels import pdl
    from tidal.kernels.residual_norm import residual_norm
    from tidal.kernels.tau_rope import tau_rope_kv


class ExpertWeights(nn.Module):
    """Stacked expert matrices, weight [num_experts, out, in]."""

    def __init__(self, num_experts: int, out_dim: int, in_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_dim, in_dim))


class MoEMLP(nn.Module):
    def __init__(self, dim: int, inner: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.router = nn.Linear(dim, num_experts)
        self.fc1 = ExpertWeights(num_experts, 2 * inner, dim)
        self.fc2 = ExpertWeights(num_experts, dim, inner)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moe_forward(x, self.router.weight, self.router.bias, self.fc1.weight, self.fc2.weight, self.top_k)

    def parts(self, x: torch.Tensor) -> torch.Tensor:
        """The fast path: [T, k, D], the k weighted expert outputs, not yet summed."""
        return moe_parts(x, self.router.weight, self.router.bias, self.fc1.weight, self.fc2.weight, self.top_k)


def tau_scales(qkv: torch.Tensor, positions: torch.Tensor, wq: torch.Tensor, wv: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-head scales for q and v, both [T, H].

    tau = tanh(gelu_exact(qkv) @ w.T) + 1 + (sigmoid(alpha * log(pos + 1)) - 0.5).
    Computed in float32: positions past 256 are not exact in bf16.
    """
    feat = F.gelu(qkv.float())
    pos_term = 1.0 + torch.sigmoid(alpha.float()[None, :] * torch.log(positions.float() + 1.0)[:, None]) - 0.5
    tau_q = torch.tanh(feat @ wq.float().T) + pos_term
    tau_v = torch.tanh(feat @ wv.float().T) + pos_term
    return tau_q, tau_v


class TextAttention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        qkv_dim = cfg.head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads)
        self.qkv = nn.Linear(cfg.dim, qkv_dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.tau = nn.ParameterDict(
            {
                "wq": nn.Parameter(torch.empty(cfg.n_heads, qkv_dim)),
                "wv": nn.Parameter(torch.empty(cfg.n_heads, qkv_dim)),
                "alpha": nn.Parameter(torch.empty(cfg.n_heads)),
            }
        )
        if cfg.n_kv_heads != cfg.n_heads:
            raise ValueError("Moondream 3 tau scaling of v needs n_kv_heads == n_heads")
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.fused_tau: torch.Tensor | None = None  # [2H, qkv_dim] float32 when the fused kernel is on
        self.fused_tau_bf16: torch.Tensor | None = None  # the same in bfloat16, for a bf16 model (tau_projection)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch, layer: int, rotary: PartialRotary) -> torch.Tensor:
        """x [T, dim] (already normed) -> [T, dim]."""
        t = x.shape[0]
        qkv = linear(x, self.qkv.weight, self.qkv.bias)
        if self.fused_tau is not None:
            # tau, rotary and the K/V write in one kernel (same arithmetic as below)
            pool = batch.kv_pool
            q = tau_rope_kv(
                qkv, self.fused_tau, self.tau["alpha"], positions, batch.out_cache_loc, rotary.cos, rotary.sin, pool.k[layer], pool.v[layer], self.n_heads, self.head_dim,
                w_tau_bf16=self.fused_tau_bf16,
            )
            return linear(batch.attn.attend(q, layer, batch).reshape(t, -1), self.proj.weight, self.proj.bias)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(t, self.n_heads, self.head_dim)
        k = k.view(t, self.n_kv_heads, self.head_dim)
        v = v.view(t, self.n_kv_heads, self.head_dim)
        tau_q, tau_v = tau_scales(qkv, positions, self.tau["wq"], self.tau["wv"], self.tau["alpha"])
        q = (q.float() * tau_q[..., None]).to(q.dtype)
        v = (v.float() * tau_v[..., None]).to(v.dtype)
        q, k = rotary(q, positions), rotary(k, positions)
        out = batch.attn.forward(q, k, v, layer, batch)
        return self.proj(out.reshape(t, q_dim))


# The fast path's parallel blocks on two streams: the MLP (MoE) branch on a
# side stream beside the attention branch; both read the block's LayerNorm
# output and the next block's residual_norm joins them. At small batch each
# of a layer's ~10 kernels is too small to fill the GPU, so the two chains
# can overlap. The same kernels on the same inputs: the same bits. Measured
# on an H100 (bench_moondream.py's `branches` part beside the default): decode
# 2.64 -> 2.40 ms at batch 1, 4.90 -> 4.35 at 8, 8.98 -> 6.96 at 32.
PARALLEL_BRANCHES = True
# The side stream's priority (CUDA: lower is higher; 0 is the default and the
# lowest). Graph capture keeps a stream's priority on each kernel node and
# torch replays graphs with node priorities, so a negative value lets the MoE
# branch's blocks take SMs first when both branches wait for them. Measured on
# an H100 (`device_run.sh priority`): -1 gave 1.79 / 3.86 / 6.00 ms at batch
# 1 / 8 / 32 against 1.80 / 3.87 / 6.02, within spread; kept at 0.
BRANCH_PRIORITY = 0
# Which of the two streams' kernels launch with programmatic dependent launch
# (tidal.kernels.pdl) while the branches run on two streams: "none", "main"
# (attention and the residual norms), "side" (the MoE branch) or "both". On
# an H100 "both" cost ~1% at batch 1 to 32 against "none" (2026-12-07): a PDL
# kernel's early-placed, waiting programs hold SMs the other stream could use.
# "main" and "side" not yet timed (`device_run.sh md-pdl-branches`).
PDL_BRANCHES = "none"
PDL_BRANCH_MODES = ("none", "main", "side", "both")


class TextBlock(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.dim)
        self.attn = TextAttention(cfg)
        self.mlp: nn.Module
        if cfg.is_moe_layer(layer):
            assert cfg.moe is not None
            self.mlp = MoEMLP(cfg.dim, cfg.moe.expert_inner_dim, cfg.moe.num_experts, cfg.moe.experts_per_token)
        else:
            self.mlp = MLP(cfg.dim, cfg.ff_dim)


class TextModel(nn.Module):
    """Embedding, decoder blocks, post-LN and lm_head (with bias)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim))
        self.blocks = nn.ModuleList(TextBlock(cfg, i) for i in range(cfg.n_layers))
        self.post_ln = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size)
        self.rotary: PartialRotary | None = None
        self.fused = False  # the Triton fast path; see use_kernels
        self.side_stream: torch.cuda.Stream | None = None  # PARALLEL_BRANCHES's, made outside graph capture

    def setup_runtime(self, device: torch.device | str) -> None:
        """Build the non-weight state (rotary tables) once weights are on `device`,
        and turn the Triton kernels on where they run (CUDA)."""
        self.rotary = PartialRotary(self.cfg.rotary_dim, self.cfg.max_context, self.cfg.rope_theta, device)

    def use_kernels(self, enabled: bool) -> None:
        """Fused Triton kernels (tau + rotary + KV write, MoE, residual + LayerNorm) or the torch reference."""
        self.fused = enabled
        if enabled and self.wte.device.type == "cuda" and self.side_stream is None:
            self.side_stream = torch.cuda.Stream(self.wte.device, priority=BRANCH_PRIORITY)
        for block in self.blocks:
            attn = block.attn
            w = torch.cat([attn.tau["wq"], attn.tau["wv"]])
            attn.fused_tau = w.float() if enabled else None
            attn.fused_tau_bf16 = w if enabled and w.dtype == torch.bfloat16 else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.wte)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Input embeddings [T, dim] -> raw hidden states [T, dim] (before post-LN)."""
        assert self.rotary is not None, "call setup_runtime() after loading weights"
        if self.fused:
            side = self.side_stream if PARALLEL_BRANCHES and x.is_cuda else None
            return self._fused_blocks(x, positions, batch, side)
        for i, block in enumerate(self.blocks):
            h = block.ln(x)
            x = x + block.attn(h, positions, batch, i, self.rotary) + block.mlp(h)
        return x

    def _fused_blocks(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch, side: torch.cuda.Stream | None) -> torch.Tensor:
        """The fast path's blocks, [T, dim] -> [T, dim]; `side`: the MoE branch's stream, or None for one stream.

        The same arithmetic as the reference loop; each block ends in one
        kernel: the MoE's sum over its k experts, both residual adds and the
        next block's LayerNorm."""
        assert self.rotary is not None
        blocks = self.blocks
        # on two streams, PDL only where PDL_BRANCHES says (its waiting programs crowd the other stream)
        if PDL_BRANCHES not in PDL_BRANCH_MODES:
            raise ValueError(f"text.PDL_BRANCHES must be one of {', '.join(PDL_BRANCH_MODES)}, got {PDL_BRANCHES!r}")
        main_pdl = side is None or PDL_BRANCHES in ("main", "both")
        side_pdl = PDL_BRANCHES in ("side", "both")
        with _pdl_scope(main_pdl):
            h = blocks[0].ln(x)
        for i, block in enumerate(blocks):
            if side is None:
                attn = block.attn(h, positions, batch, i, self.rotary)
                parts = _mlp_parts(block, h)
            else:
                # fork, then join before anything the side branch read or
                # made is released: the allocator's per-stream reuse stays safe
                main = torch.cuda.current_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side), _pdl_scope(side_pdl):
                    parts = _mlp_parts(block, h)
                with _pdl_scope(main_pdl):
                    attn = block.attn(h, positions, batch, i, self.rotary)
                main.wait_stream(side)
            with _pdl_scope(main_pdl):
                x, h = residual_norm(x, attn, parts, blocks[i + 1].ln if i + 1 < len(blocks) else None)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw hidden [N, dim] -> logits [N, vocab] (float32)."""
        return linear(self.post_ln(hidden), self.lm_head.weight, self.lm_head.bias).float()


def _pdl_scope(on: bool) -> AbstractContextManager[None]:
    """Kernels launched inside take PDL as tidal.kernels.pdl says (on), or never."""
    return nullcontext() if on else pdl.held_off()


def _mlp_parts(block: TextBlock, h: torch.Tensor) -> torch.Tensor:
    """The block's MLP branch as residual_norm's parts [T, k, dim] (k = 1 for a dense MLP)."""
    return block.mlp.parts(h) if isinstance(block.mlp, MoEMLP) else block.mlp(h)[:, None, :]
