"""Qwen3-MoE (`Qwen3MoeForCausalLM`) behind the runner's model protocol.

GQA attention with a per-head RMSNorm on q and k before rotary (full head
dim, halves layout); sparse MoE blocks (softmax router over all experts, top-k,
renormalized when norm_topk_prob; SwiGLU experts) where decoder_sparse_step
and mlp_only_layers put them, dense SwiGLU MLPs elsewhere; pre-norm residual
blocks; final RMSNorm; lm_head, tied to the embedding when the config says so.

Two paths with the same arithmetic: the torch layers (the reference, CPU),
and with use_kernels(True) the fused one (tidal.kernels: q/k norm + rotary +
K/V write, residual add + RMSNorm, routing and SwiGLU experts in Triton; q, k
and v one matmul, gate and up one matmul), which has no host sync, so decode
steps are captured as CUDA graphs. The rotary angles of a step's positions
are gathered once per step (cos/sin [T, D/2]), not per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tidal.core import ForwardBatch, KVLayout
from tidal.errors import CheckpointError
from tidal.layers.linear import linear
from tidal.layers.moe import moe_forward, moe_parts
from tidal.layers.norm import RMSNorm
from tidal.layers.rotary import PartialRotary, rotate_halves
from tidal.models.checkpoint import raise_weight_problems

from .config import Qwen3MoeConfig

MAX_CONTEXT = 32768  # the request-to-slot table and rotary tables are sized by it

# called after decoder layer i with the hidden states [T, hidden], may change them in place (Qwen3-VL's deepstack)
LayerHook = Callable[[int, torch.Tensor], None]


def _fuse_linears(*linears: nn.Linear, fused: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears on the same input: their
    parameters become views into it (no second copy of the weights). `fused`,
    an earlier result, is returned as it is while the parameters are still its
    views: fusing again would free the memory graphs captured earlier read."""
    if fused is not None and _views_of(linears, fused):
        return fused
    weight = torch.cat([m.weight.data for m in linears])
    bias = torch.cat([m.bias.data for m in linears]) if linears[0].bias is not None else None
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[start : start + n]
        if bias is not None:
            m.bias.data = bias[start : start + n]
        start += n
    return weight, bias


def _views_of(linears: tuple[nn.Linear, ...], fused: tuple[torch.Tensor, torch.Tensor | None]) -> bool:
    """Whether each linear's weight (and bias) is still its slice of `fused`."""
    weight, bias = fused
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        if m.weight.data_ptr() != weight[start : start + n].data_ptr() or m.weight.dtype != weight.dtype or m.weight.device != weight.device:
            return False
        if bias is not None and (m.bias is None or m.bias.data_ptr() != bias[start : start + n].data_ptr()):
            return False
        start += n
    return start == weight.shape[0]


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig) -> None:
        super().__init__()
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.heads, self.kv_heads, self.head_dim = h, kv, d
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # fused weight, bias while kernels are on
        self._fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # kept when they go off (see _fuse_linears)

    def use_kernels(self, enabled: bool) -> None:
        if enabled:
            self._fused = _fuse_linears(self.q_proj, self.k_proj, self.v_proj, fused=self._fused)
        self.qkv = self._fused if enabled else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, layer: int) -> torch.Tensor:
        """x [T, hidden] (normed); cos/sin [T, D/2] -> [T, hidden]."""
        t = x.shape[0]
        if self.qkv is not None:
            from tidal.kernels.rms_norm import qk_norm_rope_kv

            pool = batch.kv_pool
            qkv = linear(x, *self.qkv)
            q = qk_norm_rope_kv(qkv, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin, batch.out_cache_loc, pool.k[layer], pool.v[layer], self.heads)
            return linear(batch.attn.attend(q, layer, batch).reshape(t, -1), self.o_proj.weight, self.o_proj.bias)
        q = self.q_norm(self.q_proj(x).view(t, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(t, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        q, k = rotate_halves(q, cos, sin), rotate_halves(k, cos, sin)
        return self.o_proj(batch.attn.forward(q, k, v, layer, batch).reshape(t, -1))


class DenseMLP(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inner, bias=False)
        self.up_proj = nn.Linear(dim, inner, bias=False)
        self.down_proj = nn.Linear(inner, dim, bias=False)
        self.gate_up: torch.Tensor | None = None  # fused weight while kernels are on
        self._fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # kept when they go off

    def use_kernels(self, enabled: bool) -> None:
        if enabled:
            self._fused = _fuse_linears(self.gate_proj, self.up_proj, fused=self._fused)
        self.gate_up = self._fused[0] if enabled and self._fused is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:  # kernels on: fused gate/up, one silu * up kernel
            from tidal.kernels.silu_mul import silu_mul

            return linear(silu_mul(linear(x, self.gate_up)), self.down_proj.weight)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def parts(self, x: torch.Tensor) -> torch.Tensor:
        """[T, dim] -> [T, 1, dim] (the fused residual kernel's input)."""
        return self.forward(x)[:, None, :]


class SparseMoE(nn.Module):
    """Router `gate` [E, dim]; experts stacked: fc1 [E, 2I, dim] (gate_proj
    rows, then up_proj rows), fc2 [E, dim, I] (down_proj)."""

    def __init__(self, cfg: Qwen3MoeConfig) -> None:
        super().__init__()
        e, i, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate = nn.Linear(d, e, bias=False)
        self.fc1 = nn.Parameter(torch.empty(e, 2 * i, d))
        self.fc2 = nn.Parameter(torch.empty(e, d, i))
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moe_forward(x, self.gate.weight, None, self.fc1, self.fc2, self.top_k, act="swiglu", renormalize=self.renormalize)

    def parts(self, x: torch.Tensor) -> torch.Tensor:
        """The fused path: [T, dim] -> each token's k weighted expert outputs [T, k, dim]."""
        return moe_parts(x, self.gate.weight, None, self.fc1, self.fc2, self.top_k, act="swiglu", renormalize=self.renormalize)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = SparseMoE(cfg) if cfg.is_moe_layer(layer) else DenseMLP(cfg.hidden_size, cfg.intermediate_size)


class Qwen3MoeModel(nn.Module):
    """Parameter names follow the checkpoint's (`model.` dropped), but the
    experts: stacked as `mlp.fc1` / `mlp.fc2` (see load_weights)."""

    def __init__(self, cfg: Qwen3MoeConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.kv_layout = KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        self.max_context = min(cfg.max_position_embeddings, MAX_CONTEXT)
        self.vocab_size = cfg.vocab_size
        self.rotary: PartialRotary | None = None
        self.fused = False  # see use_kernels

    @property
    def cuda_graphs_ok(self) -> bool:
        """The torch MoE loops over the experts in use (a device sync): graphs
        only on the fused path, or where there are no sparse layers."""
        return self.fused or not any(isinstance(layer.mlp, SparseMoE) for layer in self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def setup_runtime(self, device: torch.device | str) -> None:
        """The rotary tables, once the weights are on `device`."""
        self.rotary = PartialRotary(self.config.head_dim, self.max_context, self.config.rope_theta, device)

    # -- the model protocol ------------------------------------------------------
    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        if batch.image_spans:  # (feedback_kind: zeros in decode graphs; text requests feed none)
            raise ValueError("Qwen3-MoE takes text only")
        return F.embedding(batch.input_ids, self.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """-> hidden states [T, hidden] before the final norm."""
        assert self.rotary is not None, "call setup_runtime() after loading weights"
        return self.decode(self.embed(batch), self.rotary.cos[positions], self.rotary.sin[positions], batch)

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, hook: LayerHook | None = None, hooked: int = 0) -> torch.Tensor:
        """The decoder layers: input embeddings x [T, hidden], rotary cos/sin
        [T, D/2] -> hidden states [T, hidden] before the final norm. hook runs
        after each of the first `hooked` layers."""
        layers = self.layers
        if not self.fused:
            for i, layer in enumerate(layers):
                x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, batch, i)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
                if i < hooked:
                    hook(i, x)
            return x
        from tidal.kernels.rms_norm import add_rms_norm

        first = layers[0].input_layernorm
        x, h = add_rms_norm(x, None, first.weight, first.eps)
        for i, layer in enumerate(layers):
            attn = layer.self_attn(h, cos, sin, batch, i)
            post = layer.post_attention_layernorm
            x, h = add_rms_norm(x, attn[:, None, :], post.weight, post.eps)
            parts = layer.mlp.parts(h)
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else None
            if i < hooked:  # the hook sees x before the next layer's norm reads it
                x, _ = add_rms_norm(x, parts, None, 0.0)
                hook(i, x)
                if nxt is not None:
                    _, h = add_rms_norm(x, None, nxt.weight, nxt.eps)
            else:
                x, h = add_rms_norm(x, parts, None if nxt is None else nxt.weight, 0.0 if nxt is None else nxt.eps)
        return x

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, None, dict[str, torch.Tensor]]:
        """hidden [N, hidden] -> (logits [N, vocab] float32, no extras, {"logits"})."""
        w = self.embed_tokens if self.lm_head is None else self.lm_head.weight
        logits = linear(self.norm(hidden), w).float()
        return logits, None, {"logits": logits}

    def extras_to_result(self, extras: list[int]) -> dict[str, Any]:
        return {}

    def encode_image(self, payload: object) -> torch.Tensor:
        raise ValueError("Qwen3-MoE takes text only")

    def use_kernels(self, enabled: bool) -> None:
        """The fused Triton path (see the module docstring) or the torch layers."""
        self.fused = enabled
        for layer in self.layers:
            layer.self_attn.use_kernels(enabled)
            if isinstance(layer.mlp, DenseMLP):
                layer.mlp.use_kernels(enabled)

    # -- weights -----------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into the parameters, strictly. Experts come
        one per key (`mlp.experts.{e}.{gate,up,down}_proj.weight`, Qwen3-MoE's
        Hub files) or stacked (`mlp.experts.gate_up_proj` / `down_proj`), as
        [E, out, in] (transformers 5) or [E, in, out] (Qwen3-VL-MoE's Hub files;
        told apart by shape)."""
        params = dict(self.named_parameters())
        seen: set[str] = set()
        unexpected: list[str] = []
        inner = self.config.moe_intermediate_size

        def put(name: str, tensor: torch.Tensor, index: tuple = ()) -> None:
            param = params[name]
            target = param[index] if index else param
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{name}{list(index) if index else ''}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor.to(device=param.device, dtype=param.dtype))
            seen.add(name + (str(index) if index else ""))

        for key, tensor in weights:
            name = key.removeprefix("model.")
            parts = name.split(".")
            if name in params:
                put(name, tensor)
            elif name == "embed_tokens.weight":
                put("embed_tokens", tensor)
            elif len(parts) == 7 and parts[2] == "mlp" and parts[3] == "experts" and parts[6] == "weight":
                base, e, proj = ".".join(parts[:3]), int(parts[4]), parts[5]
                if f"{base}.fc1" not in params:
                    unexpected.append(key)
                elif proj == "gate_proj":
                    put(f"{base}.fc1", tensor, (e, slice(0, inner)))
                elif proj == "up_proj":
                    put(f"{base}.fc1", tensor, (e, slice(inner, 2 * inner)))
                elif proj == "down_proj":
                    put(f"{base}.fc2", tensor, (e,))
                else:
                    unexpected.append(key)
            elif len(parts) == 5 and parts[2:4] == ["mlp", "experts"] and parts[4] in ("gate_up_proj", "down_proj"):
                base = ".".join(parts[:3])
                target = f"{base}.fc1" if parts[4] == "gate_up_proj" else f"{base}.fc2"
                if target in params and tensor.dim() == 3 and tuple(tensor.shape) != tuple(params[target].shape) and tuple(tensor.shape[1:]) == tuple(params[target].shape[:0:-1]):
                    tensor = tensor.transpose(1, 2)  # stored [E, in, out] (Qwen3-VL-MoE's Hub files)
                put(target, tensor)
            elif self.lm_head is None and name == "lm_head.weight":
                continue  # tied: the embedding serves
            else:
                unexpected.append(key)
        raise_weight_problems("Qwen3-MoE", _missing(params, seen, self.config), unexpected)


def _missing(params: dict[str, torch.Tensor], seen: set[str], cfg: Qwen3MoeConfig) -> list[str]:
    """Parameters (or experts of stacked ones) the checkpoint never filled."""
    out = []
    for name, param in params.items():
        if name in seen:
            continue
        if name.endswith((".fc1", ".fc2")):
            halves = ["gate_proj", "up_proj"] if name.endswith(".fc1") else ["down_proj"]
            for e in range(param.shape[0]):
                if name.endswith(".fc1"):
                    got = [str((e, slice(0, cfg.moe_intermediate_size))), str((e, slice(cfg.moe_intermediate_size, 2 * cfg.moe_intermediate_size)))]
                else:
                    got = [str((e,))]
                for half, mark in zip(halves, got):
                    if name + mark not in seen:
                        out.append(f"{name.rsplit('.', 1)[0]}.experts.{e}.{half}.weight")
            continue
        out.append(name)
    return out
