"""Qwen3-MoE (`Qwen3MoeForCausalLM`) behind the runner's model protocol.

GQA attention with a per-head RMSNorm on q and k before rotary (full head
dim, halves layout); sparse MoE blocks (softmax router over all experts, top-k,
renormalized when norm_topk_prob; SwiGLU experts) where decoder_sparse_step
and mlp_only_layers put them, dense SwiGLU MLPs elsewhere; pre-norm residual
blocks; final RMSNorm; lm_head, tied to the embedding when the config says so.
Text only: the torch layers everywhere (the attention backend is the
runner's: Triton on CUDA).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tidal.core import ForwardBatch, KVLayout
from tidal.errors import CheckpointError
from tidal.layers.moe import moe_forward
from tidal.layers.norm import RMSNorm
from tidal.layers.rotary import PartialRotary

from .config import Qwen3MoeConfig

MAX_CONTEXT = 32768  # the request-to-slot table and rotary tables are sized by it


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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch, layer: int, rotary: PartialRotary) -> torch.Tensor:
        """x [T, hidden] (normed) -> [T, hidden]."""
        t = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(t, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(t, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        q, k = rotary(q, positions), rotary(k, positions)
        return self.o_proj(batch.attn.forward(q, k, v, layer, batch).reshape(t, -1))


class DenseMLP(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inner, bias=False)
        self.up_proj = nn.Linear(dim, inner, bias=False)
        self.down_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        # The torch MoE loops over the experts in use (a device sync): no CUDA
        # graphs until the fused MoE kernel takes the SwiGLU activation.
        self.cuda_graphs_ok = False

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
        if batch.image_spans or batch.feedback_kind is not None:
            raise ValueError("Qwen3-MoE takes text only")
        return F.embedding(batch.input_ids, self.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """-> hidden states [T, hidden] before the final norm."""
        assert self.rotary is not None, "call setup_runtime() after loading weights"
        x = self.embed(batch)
        for i, layer in enumerate(self.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), positions, batch, i, self.rotary)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, None, dict[str, torch.Tensor]]:
        """hidden [N, hidden] -> (logits [N, vocab] float32, no extras, {"logits"})."""
        w = self.embed_tokens if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.norm(hidden), w).float()
        return logits, None, {"logits": logits}

    def extras_to_result(self, extras: list[int]) -> dict[str, Any]:
        return {}

    def encode_image(self, payload: object) -> torch.Tensor:
        raise ValueError("Qwen3-MoE takes text only")

    def use_kernels(self, enabled: bool) -> None:
        """No fused kernels for this model yet: its layers stay the torch ones."""

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
        missing = _missing(params, seen, self.config)
        problems = []
        if missing:
            problems.append(f"missing weights ({len(missing)}): {', '.join(missing[:8])}")
        if unexpected:
            problems.append(f"unexpected weights ({len(unexpected)}): {', '.join(unexpected[:8])}")
        if problems:
            raise CheckpointError("checkpoint does not match the Qwen3-MoE architecture: " + "; ".join(problems))


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
