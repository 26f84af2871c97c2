"""Qwen3-VL held to transformers (float32, CPU): logits at every output within
1e-4 for prompts with no image, one image, and two images of different sizes;
the same answers batched and with the images' prefix served from the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tidal
from tidal.engine.engine import EngineConfig
from tidal.models.qwen3_vl.processor import ImageProcessorConfig, process_image

transformers = pytest.importorskip("transformers")

IMAGE = 7
# image parts become the image placeholder token, as Qwen's template writes <|image_pad|>
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {% if m.content is string %}{{ m.content }}{% else %}"
    "{% for p in m.content %}{% if p.type == 'image' %}<|md_reserved_6|>{% else %}{{ p.text }}{% endif %}{% endfor %}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
PROCESSOR = dict(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=256, max_pixels=12_000, image_mean=[0.5] * 3, image_std=[0.5] * 3)


TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True})
VISION = dict(depth=2, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32, patch_size=8, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
# Qwen3-VL-MoE: the same with sparse blocks (2 * inner != hidden, so expert layouts are told apart by shape)
MOE = dict(moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)


def _save(tmp_path_factory, variant: str):
    torch.manual_seed(0)
    if variant == "moe":
        cfg = transformers.Qwen3VLMoeConfig(text_config=TEXT | MOE, vision_config=VISION, image_token_id=IMAGE, video_token_id=8)
        hf = transformers.Qwen3VLMoeForConditionalGeneration(cfg).eval()
    else:
        cfg = transformers.Qwen3VLConfig(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE, video_token_id=8)
        hf = transformers.Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    folder = tmp_path_factory.mktemp(f"qwen3vl-{variant}")
    hf.save_pretrained(folder)
    from tidal.models.moondream3.tiny import build_tokenizer

    build_tokenizer(96).save(str(folder / "tokenizer.json"))  # id 7 (IMAGE) is its "<|md_reserved_6|>"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (folder / "preprocessor_config.json").write_text(json.dumps({**PROCESSOR, "size": {"shortest_edge": PROCESSOR["min_pixels"], "longest_edge": PROCESSOR["max_pixels"]}, "resample": 3}))
    return hf, folder


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    hf, folder = _save(tmp_path_factory, request.param)
    llm = tidal.LLM.from_pretrained(folder, device="cpu", dtype="float32", engine_config=EngineConfig(trace_logits=True, max_running=8))
    yield hf, llm
    llm.close()


def test_moe_experts_load_from_either_stacked_layout(tmp_path_factory):
    """Qwen3-VL-MoE's Hub files stack experts as [E, in, out]; transformers 5 saves [E, out, in]."""
    from safetensors.torch import load_file, save_file

    from tidal.models.qwen3_vl.loader import load_model

    _, folder = _save(tmp_path_factory, "moe")
    saved = load_model(folder, "cpu", torch.float32)
    tensors = load_file(str(folder / "model.safetensors"))
    hub = {k: (v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v) for k, v in tensors.items()}
    save_file(hub, str(folder / "model.safetensors"))
    from_hub = load_model(folder, "cpu", torch.float32)
    for (name, a), (_, b) in zip(saved.named_parameters(), from_hub.named_parameters()):
        assert torch.equal(a, b), name


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


CASES = {
    "text": ([11, 12, 13, 40, 41], []),
    "one image": ([11, 20, IMAGE, 21, 30, 31, 32], [(40, 56, 1)]),
    "two images": ([11, 20, IMAGE, 21, 22, 20, IMAGE, 21, 50, 51], [(64, 40, 2), (33, 70, 3)]),
}


def _hf_logits(hf, ids: list[int], images: list[np.ndarray]) -> torch.Tensor:
    """transformers' logits over `ids` with each placeholder expanded to its image's tokens."""
    cfg = ImageProcessorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in PROCESSOR.items()})
    expanded, types, patches, grids = [], [], [], []
    images = list(images)
    for t in ids:
        if t == IMAGE and images:  # the prompt's placeholders (a generated token may be the same id)
            p, grid = process_image(torch.from_numpy(images.pop(0)), cfg)
            patches.append(p)
            grids.append(grid)
            expanded += [IMAGE] * (grid[1] * grid[2] // 4)
            types += [1] * (grid[1] * grid[2] // 4)
        else:
            expanded.append(t)
            types.append(0)
    types = torch.tensor([types])
    kwargs = {"pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids), "mm_token_type_ids": types} if patches else {}
    with torch.no_grad():
        return hf(input_ids=torch.tensor([expanded]), **kwargs).logits[0].float(), len(expanded)


def _run(llm, cases: list[tuple[list[int], list[np.ndarray]]], max_tokens: int):
    params = tidal.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    handles = [llm._submit(*llm._prepare({"prompt_token_ids": ids, "images": imgs}, params, ignore_eos=True)) for ids, imgs in cases]
    out = []
    for h in handles:
        res = h.wait()
        out.append((res["token_ids"], torch.stack([t.logits.flatten() for t in h.request.trace])))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(pair, name):
    hf, llm = pair
    ids, specs = CASES[name]
    images = [_image(*s) for s in specs]
    ((tokens, logits),) = _run(llm, [(ids, images)], 6)
    # transformers counts image tokens by id: compare the outputs whose inputs hold no generated image-token id
    n = next((i + 1 for i, t in enumerate(tokens) if t == IMAGE), len(tokens))
    full, length = _hf_logits(hf, ids + tokens[: n - 1], images)
    want = full[length - n : length]
    assert _rel(logits[:n], want) <= 1e-4, _rel(logits[:n], want)
    assert tokens[:n] == want.argmax(-1).tolist()


def test_batched_and_cached_give_the_same_logits(pair):
    _, llm = pair
    cases = [(CASES[n][0], [_image(*s) for s in CASES[n][1]]) for n in sorted(CASES)]
    alone = [_run(llm, [c], 6)[0] for c in cases]
    together = _run(llm, cases, 6)  # and the images' prefixes now come from the cache
    for (ta, la), (tb, lb) in zip(alone, together):
        assert ta == tb and _rel(lb, la) <= 1e-5
    assert llm.engine.snapshot()["cache_hit_positions"] > 0


def test_placeholders_must_match_the_images(pair):
    _, llm = pair
    with pytest.raises(tidal.InvalidRequestError, match="1 image placeholders .* 2 images"):
        llm.generate({"prompt_token_ids": [11, IMAGE, 12], "images": [_image(20, 20, 0), _image(20, 20, 1)]})


def test_chat_completions_with_an_image_part(pair):
    """The OpenAI route turns image parts into the template's placeholders and
    the images into the request's: the answer equals LLM.generate's."""
    import base64
    import io

    import openai
    from conftest import LiveServer
    from PIL import Image

    from tidal.server.app import create_llm_app
    from tidal.server.config import ServerConfig

    _, llm = pair
    img = _image(40, 56, 9)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "image"}, {"type": "text", "text": "this"}]}]
    prompt = llm.chat_template.render(messages)
    want = llm.generate({"prompt": prompt, "images": [img]}, tidal.SamplingParams(temperature=0.0, max_tokens=5), ignore_eos=True)
    config = ServerConfig(model_name="qwen3-vl-test")
    srv = LiveServer(llm, config, app=create_llm_app(llm, config))
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
        content = [{"type": "text", "text": "what is"}, {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "this"}]
        got = client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], max_tokens=5, temperature=0, extra_body={})
        assert got.choices[0].message.content == want["text"]
        assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    finally:
        srv.stop()


def test_preempted_and_resumed_gives_the_same_logits(pair):
    """Preempted after its image prefill and a few tokens, a request recomputes
    its history (images and their M-RoPE offsets included) and continues as if
    alone. (A uniform shift of every rotary index would not show here: rotary
    attention sees only differences.)"""
    from tidal.engine.request import Request

    _, llm = pair
    ids, specs = CASES["two images"]
    images = [_image(*s) for s in specs]
    ((want_tokens, want),) = _run(llm, [(ids, images)], 8)
    skill, items = llm._prepare({"prompt_token_ids": ids, "images": images}, tidal.SamplingParams(temperature=0.0, max_tokens=8), ignore_eos=True)
    req = llm.loop.call(lambda e: _start_and_preempt(e, Request(skill=skill, pending=items, bidir_len=0)))
    assert req.preemptions == 1 and req.finished
    assert skill.tokens == want_tokens
    assert _rel(torch.stack([t.logits.flatten() for t in req.trace]), want) <= 1e-5


def _start_and_preempt(engine, req):
    engine.add_request(req)
    for _ in range(4):  # the prompt, then three tokens
        engine.step()
    engine.scheduler.preempt(req)
    engine.clear_prefix_cache()  # so it recomputes everything rather than reusing its cached prompt
    while not req.finished:
        engine.step()
    return req


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_images_sent_again_as_bytes_are_not_decoded_while_cached(pair, monkeypatch):
    """A chat resending its images each turn: the second time the same bytes
    come, their pixels key and size are known and, with the prompt up to the
    image cached, they are not decoded; the logits equal the first run's. If
    the cache lets them go before the step, the engine decodes them."""
    import tidal.llm
    from tidal.core import Deferred

    _, llm = pair
    decodes = []
    real = tidal.llm.decoded_pixels
    monkeypatch.setattr(tidal.llm, "decoded_pixels", lambda *a, **k: decodes.append(1) or real(*a, **k))
    ids = CASES["two images"][0]
    images = [_png(_image(*s)) for s in [(48, 40, 11), (33, 70, 12)]]
    ((tokens, logits),) = _run(llm, [(ids, images)], 6)
    assert len(decodes) == 2
    ((again_tokens, again_logits),) = _run(llm, [(ids, images)], 6)
    assert len(decodes) == 2  # known by their bytes, served from the cache
    assert again_tokens == tokens and _rel(again_logits, logits) <= 1e-5
    params = tidal.SamplingParams(temperature=0.0, max_tokens=6)
    skill, items = llm._prepare({"prompt_token_ids": ids, "images": images}, params, ignore_eos=True)
    assert all(isinstance(i.payload, Deferred) for i in items if not isinstance(i, int))
    assert llm.loop.call(lambda engine: engine.clear_prefix_cache()) > 0
    handle = llm._submit(skill, items)
    res = handle.wait()
    assert len(decodes) == 4  # the engine made both deferred payloads
    assert res["token_ids"] == tokens and _rel(torch.stack([t.logits.flatten() for t in handle.request.trace]), logits) <= 1e-5
