"""The `openai` client against tidal's OpenAI-compatible chat completions."""

from __future__ import annotations

import base64
import json

import openai
import pytest
from conftest import (
    LiveServer,
    PromptRecorder,
    golden_cases,
    golden_image,
    wait_engine_idle,
)

from tidal import EngineConfig, Moondream
from tidal.server.config import ServerConfig


@pytest.fixture(scope="module")
def live(golden_md):
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig())
    srv = LiveServer(md, ServerConfig(model_name="moondream3-test"))
    yield srv
    srv.stop()
    md.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")


def _url(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode(golden_image(name).read_bytes()).decode()


def _ask(client, text: str | None, image: str | None = "wide", stream: bool = False, **kw):
    content: list[dict] = []
    if image:
        content.append({"type": "image_url", "image_url": {"url": _url(image)}})
    if text is not None:
        content.append({"type": "text", "text": text})
    return client.chat.completions.create(model="moondream3-test", messages=[{"role": "user", "content": content}], stream=stream, **kw)


def _golden(kind: str, image: str = "wide", **match):
    return next(c for c in golden_cases(kind) if c["image"] == image and all(c.get(k) == v or c["settings"].get(k) == v for k, v in match.items()))


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["moondream3-test"]


def test_plain_text_is_a_query(client, golden_md):
    want = _golden("query", question="what color is the car", reasoning=False)
    out = _ask(client, "what color is the car", temperature=0, max_tokens=16)
    assert out.choices[0].message.content == want["result"]["answer"]
    assert out.choices[0].finish_reason == "stop"
    local = golden_md.submit_query(golden_image("wide"), "what color is the car", settings={"temperature": 0, "max_tokens": 16})
    local.wait()
    generated = local.request.skill.completion_tokens  # tokens decoded, special ones included
    assert out.usage.prompt_tokens == 730 + 3 + 5 + 1  # BOS + image, template prefix, question, suffix
    assert out.usage.completion_tokens == generated >= 2
    assert out.usage.total_tokens == out.usage.prompt_tokens + generated


def test_skill_prefixes(client):
    q = _golden("query", question="how many people are there", reasoning=False)
    assert _ask(client, "query: how many people are there", temperature=0, max_completion_tokens=16).choices[0].message.content == q["result"]["answer"]
    r = _golden("query", question="how many people are there", reasoning=True)
    out = _ask(client, "reason: how many people are there", temperature=0, max_tokens=16).choices[0].message
    assert out.content == r["result"]["answer"]
    assert out.model_extra["reasoning_content"] == r["result"]["reasoning"]["text"]
    for length in ("short", "long"):
        c = _golden("caption", length=length)
        assert _ask(client, f"caption: {length}", temperature=0, max_tokens=16).choices[0].message.content == c["result"]["caption"]
    d = _golden("detect", image="tall", object="dog", max_objects=8)
    got = json.loads(_ask(client, "detect: dog", image="tall").choices[0].message.content)
    assert len(got["objects"]) > 8  # the default max_objects (150) lets it go on past the reference's 8
    assert got["objects"][:8] == d["result"]["objects"]  # greedy: the same first 8
    p = _golden("point", image="tall", object="dog", max_objects=3)
    got = json.loads(_ask(client, "point dog", image="tall").choices[0].message.content)  # vLLM-style prefix
    assert got["points"][:3] == p["result"]["points"]


def test_image_without_text_is_a_normal_caption(client):
    c = _golden("caption", length="normal")
    assert _ask(client, None, temperature=0, max_tokens=16).choices[0].message.content == c["result"]["caption"]


def test_streaming(client, live):
    want = _golden("query", question="describe this image", reasoning=False)
    stream = _ask(client, "describe this image", stream=True, temperature=0, max_tokens=16, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want["result"]["answer"]
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage.completion_tokens >= 2
    boxes = list(_ask(client, "detect: dog", image="tall", stream=True))
    assert json.loads("".join(ch.choices[0].delta.content or "" for ch in boxes if ch.choices))["objects"]
    wait_engine_idle(live.md)


def test_sampling_options(client):
    kw = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 10, "seed": 7}
    a = _ask(client, "describe this image", image="big", **kw).choices[0].message.content
    b = _ask(client, "describe this image", image="big", **kw).choices[0].message.content
    assert a == b
    cut = _ask(client, "what color is the car", temperature=0, max_tokens=16, stop=[" w40968"]).choices[0].message.content
    assert cut == "w38499"
    capped = _ask(client, "caption: long", image="big", temperature=1.0, max_tokens=3, seed=1)
    assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 3


def test_local_files_when_the_server_allows_them(golden_md):
    md = Moondream(golden_md.model, golden_md.tokenizer, EngineConfig())
    srv = LiveServer(md, ServerConfig(local_files_root=golden_image("tall").parent))
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
        want = _golden("caption", image="tall", length="short")["result"]["caption"]
        for url in (str(golden_image("tall")), "file://" + str(golden_image("tall"))):
            msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "caption: short"}]}]
            out = client.chat.completions.create(model="m", messages=msg, temperature=0, max_tokens=16)
            assert out.choices[0].message.content == want
        wait_engine_idle(md)
    finally:
        srv.stop()
        md.close()


@pytest.mark.parametrize("text, skill, args", [
    ("what color is the car", "query", ("what color is the car", False)),
    ("query: how many people are there", "query", ("how many people are there", False)),
    ("reason: how many people are there", "query", ("how many people are there", True)),
    ("caption: long", "caption", ("long",)),
    ("caption: short", "caption", ("short",)),
    (None, "caption", ("normal",)),
    ("detect: red dog", "locate", ("red dog", "detect")),
    ("point dog", "locate", ("dog", "point")),
])
def test_each_route_builds_the_skills_prompt(client, live, text, skill, args):
    """Greedy text on the fixture is the same whatever the question or length: check the prompt."""
    rec = PromptRecorder(live.md)
    try:
        _ask(client, text, temperature=0, max_tokens=2)
        assert rec.last_text_items() == rec.expected(skill, *args)
        assert rec.calls[-1][0].name == ("query" if skill == "query" else args[-1] if skill == "locate" else "caption")
    finally:
        del live.md._submit  # back to the class's method
