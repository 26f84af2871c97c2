"""Dense Qwen3 (`Qwen3ForCausalLM`) held to transformers (float32, CPU): the
Qwen3-MoE decoder with a dense MLP in every layer. Logits at every output
within 1e-4, greedy tokens alone, batched and from the prefix cache; the fused
path (Triton kernels: under the CPU interpreter here, on the GPU where there is one) gives the torch path's logits."""

from __future__ import annotations

import json

import pytest
import torch

import tidal
from tidal.engine.engine import EngineConfig
from tidal.errors import CheckpointError

transformers = pytest.importorskip("transformers")
pytest.importorskip("triton")

import test_qwen3_moe as moe  # noqa: E402

CONFIG = dict(vocab_size=moe.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tidal.models.moondream3.tiny import build_tokenizer

    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**CONFIG)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(folder)
    build_tokenizer(moe.VOCAB).save(str(folder / "tokenizer.json"))
    return hf, folder


def _llm(folder, kernels: bool = False, device: str = "cpu"):
    return tidal.LLM.from_pretrained(folder, device=device, dtype="float32", engine_config=EngineConfig(trace_logits=True, max_running=8, kernels=kernels))


def test_logits_and_greedy_tokens_match_transformers(checkpoint):
    hf, folder = checkpoint
    llm = _llm(folder)
    try:
        assert not any(hasattr(layer.mlp, "fc1") for layer in llm.model.layers)  # dense everywhere
        alone = [moe._run(llm, [p], 8)[0] for p in moe.PROMPTS]
        for prompt, (tokens, logits) in zip(moe.PROMPTS, alone):
            want = moe._hf_logits(hf, prompt + tokens)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
            assert moe._rel(logits, want) <= 1e-4
            assert tokens == want.argmax(-1).tolist()
        together = moe._run(llm, moe.PROMPTS, 8)  # batched, and the prompts' prefixes now cached
        for (ta, la), (tb, lb) in zip(alone, together):
            assert ta == tb and moe._rel(lb, la) <= 1e-5
        assert llm.engine.snapshot()["cache_hit_positions"] > 0
    finally:
        llm.close()


def test_fused_path_gives_the_torch_paths_logits(checkpoint):
    _, folder = checkpoint
    # the interpreter runs the kernels on CPU tensors only; with a GPU both paths run on it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for kernels in (False, True):
        llm = _llm(folder, kernels, device)
        try:
            out[kernels] = moe._run(llm, moe.PROMPTS[:2], 5)
        finally:
            llm.close()
    for (ta, la), (tb, lb) in zip(out[False], out[True]):
        assert ta == tb and moe._rel(lb, la) <= 1e-4


def test_sliding_window_checkpoints_are_refused(checkpoint, tmp_path):
    import shutil

    _, folder = checkpoint
    copy = tmp_path / "sw"
    shutil.copytree(folder, copy)
    raw = json.loads((copy / "config.json").read_text())
    raw["use_sliding_window"] = True
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="sliding-window"):
        tidal.LLM.from_pretrained(copy, device="cpu")


def test_fused_weights_are_made_once_and_stay_views(checkpoint):
    """Turning the kernels off and on again keeps the fused q/k/v and gate/up
    tensors (graphs captured earlier read them); parameters replaced since are fused anew."""
    from tidal.models.qwen3_moe.loader import load_model

    _, folder = checkpoint
    model = load_model(folder, "cpu", torch.float32, dense=True)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    model.use_kernels(True)
    qkv, gate_up = attn.qkv[0], mlp.gate_up
    assert attn.k_proj.weight.data_ptr() == qkv[attn.q_proj.weight.shape[0] :].data_ptr()  # a view, not a copy
    model.use_kernels(False)
    assert attn.qkv is None and mlp.gate_up is None
    model.use_kernels(True)
    assert attn.qkv[0] is qkv and mlp.gate_up is gate_up
    new = torch.randn_like(attn.v_proj.weight)
    attn.v_proj.weight = torch.nn.Parameter(new)  # replaced: no longer a view of the fused tensor
    model.use_kernels(True)
    assert attn.qkv[0] is not qkv and torch.equal(attn.qkv[0][-new.shape[0] :], new)
    assert attn.v_proj.weight.data_ptr() == attn.qkv[0][-new.shape[0] :].data_ptr()
