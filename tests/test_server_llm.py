"""`tidal serve` for a text model (Qwen3-MoE): the `openai` client against
/v1/completions and /v1/chat/completions, answers equal to tidal.LLM's."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import LiveServer
from test_qwen3_moe import CHAT_TEMPLATE, _checkpoint

import tidal
from tidal.server.config import ServerConfig

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tokenizers import Tokenizer

    from tidal.server.app import create_llm_app

    _, folder = _checkpoint(tmp_path_factory, "base")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(folder / "tokenizer.json")))
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(folder)
    llm = tidal.LLM.from_pretrained(folder, device="cpu")
    config = ServerConfig(model_name="qwen3-moe-test")
    srv = LiveServer(llm, config, app=create_llm_app(llm, config))
    yield llm, srv
    srv.stop()
    llm.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[1].url}/v1", api_key="unused")


GREEDY = tidal.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=7)


def test_completions_equal_llm_generate(served, client):
    llm, _ = served
    want = llm.generate("what color is the car", GREEDY, ignore_eos=True)
    got = client.completions.create(model="qwen3-moe-test", prompt="what color is the car", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].text == want["text"] and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 7 and got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    ids = llm.tokenizer.encode("what color is the car", add_special_tokens=False).ids
    by_ids = client.completions.create(model="qwen3-moe-test", prompt=ids, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == want["text"]
    streamed = client.completions.create(model="qwen3-moe-test", prompt="what color is the car", max_tokens=7, temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == want["text"]


def test_chat_completions_apply_the_chat_template(served, client):
    llm, _ = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    want = llm.chat(messages, GREEDY)
    got = client.chat.completions.create(model="qwen3-moe-test", messages=messages, max_tokens=7, temperature=0)
    assert got.choices[0].message.content == want["text"]
    assert got.choices[0].finish_reason == want["finish_reason"]
    chunks = client.chat.completions.create(model="qwen3-moe-test", messages=messages, max_tokens=7, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["text"]


def test_what_a_text_model_cannot_do_is_refused_clearly(served, client):
    _, srv = served
    r = httpx.post(f"{srv.url}/v1/query", json={"question": "what is this"})
    assert r.status_code == 404 and "Moondream 3's API" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="text model"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    with pytest.raises(openai.BadRequestError, match="takes no videos"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:image/png;base64,AAAA"}}]}])
    with pytest.raises(openai.BadRequestError, match="not supported.*logprobs"):
        client.completions.create(model="m", prompt="hi", logprobs=2)
    with pytest.raises(openai.BadRequestError, match=r"\[0, 320\)"):
        client.completions.create(model="m", prompt=[999], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # 0 is refused, not read as "unset"
        client.completions.create(model="m", prompt="hi", max_tokens=0)
    assert client.models.list().data[0].id == "qwen3-moe-test"
