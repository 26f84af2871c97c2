"""The FastAPI application: Moondream and OpenAI endpoints over one engine."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidal.api import Moondream
from tidal.llm import LLM
from tidal.server.config import ServerConfig
from tidal.server.errors import error_body, install_error_handlers
from tidal.server.moondream_routes import moondream_router
from tidal.server.openai_routes import openai_router
from tidal.server.state import ServerState

logger = logging.getLogger("tidal.server")


class BodyLimit:
    """413 for request bodies over the limit: by Content-Length, or by reading
    the body (which FastAPI buffers anyway) before the route sees it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._reject(send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then disconnect notices, as usual

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(error_body(f"request body is over the limit of {self.max_bytes} bytes", "request_too_large")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(md: Moondream, config: ServerConfig | None = None) -> FastAPI:
    """Moondream 3 behind its own API and OpenAI's chat completions."""
    config = config or ServerConfig()
    state = ServerState(md, config)
    app = FastAPI(title="tidal", version="0.1.0", description="Moondream 3 behind Moondream- and OpenAI-compatible APIs")
    app.include_router(moondream_router(state))
    app.include_router(openai_router(state))
    return _common(app, state, md)


def create_llm_app(llm: LLM, config: ServerConfig | None = None) -> FastAPI:
    """Any text model tidal.LLM runs, behind OpenAI's completions and chat completions."""
    from tidal.server.llm_routes import llm_router

    config = config or ServerConfig()
    state = ServerState(llm, config)
    app = FastAPI(title="tidal", version="0.1.0", description="a text model behind OpenAI-compatible APIs")
    app.include_router(llm_router(state, llm))
    return _common(app, state, llm)


def _common(app: FastAPI, state: ServerState, md: Moondream | LLM) -> FastAPI:
    """Error handlers, /health, /metrics and the body limit."""
    config = state.config
    app.state.tidal = state
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Any:
        snap = md.loop.snapshot
        ok = md.loop.crashed is None
        body = {"status": "ok" if ok else "error", "model": config.model_name, "queue_length": md.loop.queue_length(), "running": snap["running"], "uptime_s": round(time.time() - state.started, 1)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    return app
