"""The server's JSON bodies: pydantic-core's parser, read as the standard library reads them."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import APIRouter, Body, FastAPI

from tidal.server import json_body
from tidal.server.errors import install_error_handlers
from tidal.server.json_body import FastJSONRoute

BODIES = [
    b'{"a": [1, 2.5, -0.0, 1e-310, 12345678901234567890123, true, false, null], "b": {"c": "d"}}',
    '{"text": "caf\u00e9 \u2603 \U0001f600", "escaped": "\\u00e9\\n\\t\\"\\\\ \\ud83d\\ude00"}'.encode(),
    b'{"x": 1, "x": 2}',  # the last of a repeated key
    b'{"big": 1e400, "nan": NaN, "inf": -Infinity}',
    b'{"lone": "\\ud800"}',  # a lone surrogate: pydantic-core refuses it, the standard library reads it
    json.dumps({"utf16": "\u00e9"}).encode("utf-16"),  # another encoding: the standard library's reading
    b'  {"url": "data:image/png;base64,' + b"QUJD" * 50_000 + b'"}\n',
]


def _echo_app() -> FastAPI:
    """A route that answers the repr of the body it was given."""
    router = APIRouter(route_class=FastJSONRoute)

    @router.post("/echo")
    async def echo(body: dict = Body(...)) -> dict:
        return {"repr": repr(body)}

    app = FastAPI()
    app.include_router(router)
    install_error_handlers(app)
    return app


def _post(app: FastAPI, content: bytes, path: str = "/echo") -> httpx.Response:
    import asyncio

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post(path, content=content, headers={"content-type": "application/json"})

    return asyncio.run(go())


@pytest.fixture()
def parsed_lengths(monkeypatch) -> list[int]:
    """The length of each body pydantic-core's parser is handed, in order."""
    calls: list[int] = []
    real = json_body.from_json
    monkeypatch.setattr(json_body, "from_json", lambda data: calls.append(len(data)) or real(data))
    return calls


@pytest.mark.parametrize("raw", BODIES, ids=range(len(BODIES)))
def test_bodies_read_as_the_standard_library_reads_them(raw, parsed_lengths):
    calls = parsed_lengths
    app = _echo_app()
    r = _post(app, raw)
    assert r.status_code == 200, r.text
    assert r.json()["repr"] == repr(json.loads(raw))
    assert calls == [len(raw)]  # pydantic-core saw the body first


def test_malformed_json_gets_the_standard_librarys_message():
    app = _echo_app()
    raw = b'{"question": "hi", '
    r = _post(app, raw)
    try:
        json.loads(raw)
    except json.JSONDecodeError as exc:
        want = exc.msg
    assert r.status_code == 400
    assert r.json()["error"]["message"] == f"malformed JSON body: {want}"


def test_every_body_route_of_both_apps_parses_with_it(golden_md, parsed_lengths):
    """The Moondream app's routes parse with pydantic-core (requests that fail
    validation, so no model runs), and every POST route of the Moondream, OpenAI
    and text-model routers is a FastJSONRoute."""
    from tidal.server.app import create_app
    from tidal.server.config import ServerConfig
    from tidal.server.llm_routes import llm_router
    from tidal.server.moondream_routes import moondream_router
    from tidal.server.openai_routes import openai_router
    from tidal.server.state import ServerState

    calls = parsed_lengths
    app = create_app(golden_md)
    sent = (("/v1/query", b'{"image_url": "data:image/png;base64,QUJD"}'), ("/v1/chat/completions", b'{"max_tokens": 4}'))
    for path, body in sent:
        r = _post(app, body, path)
        assert r.status_code == 400 and "Field required" in r.json()["error"]["message"], r.text
    assert calls == [len(body) for _, body in sent]
    state = ServerState(golden_md, ServerConfig())
    for router in (moondream_router(state), openai_router(state), llm_router(state, golden_md)):
        posts = [r for r in router.routes if "POST" in r.methods]
        assert posts and all(isinstance(r, FastJSONRoute) for r in posts), [type(r).__name__ for r in posts]
