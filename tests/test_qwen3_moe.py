"""Qwen3-MoE held to transformers' own implementation (float32, CPU).

Tiny random configs of the family are saved as Hugging Face checkpoints with a
locally built tokenizer; tidal loads them through tidal.LLM and must give
transformers' logits at every output (prompt and cached decode steps) and its
greedy tokens, alone, batched and with a cached prefix.
"""

from __future__ import annotations

import json

import pytest
import torch

import tidal
from tidal.engine.engine import EngineConfig
from tidal.errors import CheckpointError, InvalidRequestError

transformers = pytest.importorskip("transformers")  # a test dependency: installed wherever the suite runs

VOCAB = 320
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    mlp_only_layers=[1],
    max_position_embeddings=512,
    norm_topk_prob=True,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)
VARIANTS = {
    "base": {},
    # no renormalization of the top-k, tied embeddings, MoE every second layer, more experts per token
    "variant": dict(norm_topk_prob=False, tie_word_embeddings=True, decoder_sparse_step=2, mlp_only_layers=[], num_experts_per_tok=4, num_key_value_heads=1),
}


def _checkpoint(tmp_path_factory, name: str, seed: int = 0):
    from tidal.models.moondream3.tiny import build_tokenizer

    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(**(BASE | VARIANTS[name]))
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # larger random weights than the init's 0.02: logits that vary
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp(f"qwen3moe-{name}")
    hf.save_pretrained(folder)
    build_tokenizer(VOCAB).save(str(folder / "tokenizer.json"))
    gen = folder / "generation_config.json"
    if gen.exists():
        raw = json.loads(gen.read_text())
        raw["eos_token_id"] = 0
        gen.write_text(json.dumps(raw))
    return hf, folder


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    hf, folder = _checkpoint(tmp_path_factory, request.param)
    llm = tidal.LLM.from_pretrained(folder, device="cpu", dtype="float32", engine_config=EngineConfig(trace_logits=True, max_running=8))
    yield hf, llm, folder
    llm.close()


PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [11], list(range(20, 60)), [300, 2, 2, 2, 9, 150]]


def _run(llm, prompts, max_tokens):
    """Greedy, never stopping early: (tokens, per-output logits) per prompt, run together."""
    params = tidal.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    handles = [llm._submit(*llm._prepare({"prompt_token_ids": p}, params, ignore_eos=True)) for p in prompts]
    outs = []
    for h in handles:
        res = h.wait()
        outs.append((res["token_ids"], torch.stack([t.logits.flatten() for t in h.request.trace])))
    return outs


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_logits_match_transformers_at_every_output(pair):
    """Prompt and decode outputs (tidal's paged cache, batched) against one
    full transformers forward over prompt + generated tokens."""
    hf, llm, _ = pair
    for prompt, (tokens, logits) in zip(PROMPTS, _run(llm, PROMPTS, 8)):
        want = _hf_logits(hf, prompt + tokens)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
        assert logits.shape == want.shape
        assert _rel(logits, want) <= 1e-4, _rel(logits, want)
        assert tokens == want.argmax(-1).tolist()


def test_greedy_generation_equals_transformers_alone_batched_and_cached(pair):
    hf, llm, _ = pair
    want = []
    for p in PROMPTS:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        want.append(out[0, len(p) :].tolist())
    alone = [_run(llm, [p], 32)[0] for p in PROMPTS]
    together = _run(llm, PROMPTS, 32)
    # the same prompts again: their prefixes now come from the prefix cache
    cached = _run(llm, PROMPTS, 32)
    for w, a, t, c in zip(want, alone, together, cached):
        assert a[0] == w and t[0] == w and c[0] == w
        assert _rel(t[1], a[1]) <= 1e-5 and _rel(c[1], a[1]) <= 1e-5
    assert llm.engine.snapshot()["cache_hit_positions"] >= sum(len(p) - 1 for p in PROMPTS)


def test_prompt_strings_use_the_checkpoints_tokenizer(pair):
    hf, llm, _ = pair
    text = "what color is the car"
    ids = llm.tokenizer.encode(text, add_special_tokens=False).ids
    by_text = llm.generate(text, tidal.SamplingParams(temperature=0.0, max_tokens=6), ignore_eos=True)
    by_ids = llm.generate({"prompt_token_ids": ids}, tidal.SamplingParams(temperature=0.0, max_tokens=6), ignore_eos=True)
    assert by_text["token_ids"] == by_ids["token_ids"] and len(by_text["token_ids"]) == 6
    assert by_text["text"] == llm.tokenizer.decode(by_text["token_ids"])
    assert by_text["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6}
    assert by_text["finish_reason"] == "length"


def test_generation_stops_at_the_end_token(tmp_path_factory):
    """Without ignore_eos a request ends on generation_config's end token."""
    hf, folder = _checkpoint(tmp_path_factory, "base")
    prompt = PROMPTS[0]
    greedy = _hf_logits(hf, prompt).argmax(-1).tolist()[-1]  # the first token transformers would pick
    raw = json.loads((folder / "generation_config.json").read_text())
    raw["eos_token_id"] = [greedy]
    (folder / "generation_config.json").write_text(json.dumps(raw))
    llm = tidal.LLM.from_pretrained(folder, device="cpu")
    try:
        out = llm.generate({"prompt_token_ids": prompt}, tidal.SamplingParams(temperature=0.0, max_tokens=10))
        assert out["token_ids"] == [] and out["finish_reason"] == "stop"
    finally:
        llm.close()


def test_both_expert_layouts_load_the_same_weights(tmp_path_factory):
    """The Hub's per-expert keys and transformers 5's stacked experts give the same model."""
    from safetensors.torch import load_file, save_file

    from tidal.models.qwen3_moe.loader import load_model

    _, folder = _checkpoint(tmp_path_factory, "base")
    per_expert = load_model(folder, "cpu", torch.float32)
    tensors = load_file(str(folder / "model.safetensors"))
    stacked: dict[str, torch.Tensor] = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(BASE["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp.experts"
        if f"{prefix}.0.gate_proj.weight" not in tensors:
            continue
        e = range(BASE["num_experts"])
        stacked[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{prefix}.{i}.gate_proj.weight"], tensors[f"{prefix}.{i}.up_proj.weight"]]) for i in e])
        stacked[f"{prefix}.down_proj"] = torch.stack([tensors[f"{prefix}.{i}.down_proj.weight"] for i in e])
    save_file(stacked, str(folder / "model.safetensors"))
    fused = load_model(folder, "cpu", torch.float32)
    for (name, a), (_, b) in zip(per_expert.named_parameters(), fused.named_parameters()):
        assert torch.equal(a, b), name
    # a missing expert is named
    del stacked["model.layers.0.mlp.experts.down_proj"]
    save_file(stacked, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.experts\.0\.down_proj"):
        load_model(folder, "cpu", torch.float32)


def test_bad_requests_say_what_is_accepted(pair):
    _, llm, _ = pair
    with pytest.raises(InvalidRequestError, match="text only"):
        llm.generate({"prompt": "hi", "images": ["x.png"]})
    with pytest.raises(InvalidRequestError, match="exactly one"):
        llm.generate({"prompt": "hi", "prompt_token_ids": [1]})
    with pytest.raises(InvalidRequestError, match=r"\[0, 320\)"):
        llm.generate({"prompt_token_ids": [VOCAB]})
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        llm.generate("hi", tidal.SamplingParams(max_tokens=0))


def test_unsupported_architectures_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM.*Qwen3MoeForCausalLM"):
        tidal.LLM.from_pretrained(tmp_path, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_logits_match_transformers_on_cuda(tmp_path_factory):
    """The same on the GPU: the runner's Triton attention (GQA) under this model."""
    hf, folder = _checkpoint(tmp_path_factory, "base")
    llm = tidal.LLM.from_pretrained(folder, device="cuda", dtype="float32", engine_config=EngineConfig(trace_logits=True, max_running=8))
    try:
        for prompt, (tokens, logits) in zip(PROMPTS, _run(llm, PROMPTS, 8)):
            want = _hf_logits(hf, prompt + tokens)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
            assert _rel(logits.cpu(), want) <= 1e-4
            assert tokens == want.argmax(-1).tolist()
    finally:
        llm.close()


# A chat template in the style of Qwen's: system prompt, tools as JSON, loop
# controls, a thinking switch, an error for unknown roles.
CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- 'Tools:\\n' }}{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "  {%- if message.role == 'system' and loop.first %}{%- continue %}{%- endif %}\n"
    "  {%- if message.role not in ['user', 'assistant', 'system'] %}{{- raise_exception('unknown role ' + message.role) }}{%- endif %}\n"
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    # block tags without '-': what trim_blocks and lstrip_blocks remove shows
    "\n{% if add_generation_prompt %}\n<|im_start|>assistant\n"
    "    {% if enable_thinking is defined and enable_thinking is false %}\n<think>\n\n</think>\n\n    {% endif %}\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "what color is the car"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "why é ü <b>"}],
]


def test_chat_templates_render_as_transformers_renders_them(tmp_path_factory):
    from tidal.chat_template import ChatTemplate

    _, folder = _checkpoint(tmp_path_factory, "base")
    from tokenizers import Tokenizer

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(folder / "tokenizer.json")), eos_token="<|endoftext|>")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(folder)
    template = ChatTemplate.from_folder(folder)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"city": "Zürich"}}}]
    for messages in CONVERSATIONS:
        for kwargs in ({}, {"enable_thinking": False}, {"tools": tools}):
            for gen in (True, False):
                want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)
                assert template.render(messages, add_generation_prompt=gen, **kwargs) == want
    with pytest.raises(InvalidRequestError, match="unknown role tool_x"):
        template.render([{"role": "tool_x", "content": "?"}])
    llm = tidal.LLM.from_pretrained(folder, device="cpu")
    try:
        params = tidal.SamplingParams(temperature=0.0, max_tokens=5)
        rendered = template.render(CONVERSATIONS[1], enable_thinking=False)
        assert llm.chat(CONVERSATIONS[1], params, ignore_eos=True, enable_thinking=False) == llm.generate(rendered, params, ignore_eos=True)
        both = llm.chat(CONVERSATIONS, params, ignore_eos=True)
        assert [o["token_ids"] for o in both] == [llm.generate(template.render(m), params, ignore_eos=True)["token_ids"] for m in CONVERSATIONS]
    finally:
        llm.close()


def test_streaming_and_stop_strings(pair):
    """stream() yields the text generate() returns; a stop string ends the text before it."""
    _, llm, _ = pair
    params = tidal.SamplingParams(temperature=0.0, max_tokens=12)
    full = llm.generate("what color is the car", params, ignore_eos=True)
    assert "".join(llm.stream("what color is the car", params, ignore_eos=True)) == full["text"]
    words = full["text"].split()
    assert len(words) >= 3
    stop = words[2]
    cut = llm.generate("what color is the car", tidal.SamplingParams(temperature=0.0, max_tokens=12, stop=[stop]), ignore_eos=True)
    assert cut["text"] == full["text"][: full["text"].find(stop)] and cut["finish_reason"] == "stop"
    assert len(cut["token_ids"]) < 12
