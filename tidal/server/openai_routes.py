"""OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request

from tidal.engine.loop import RequestHandle
from tidal.server.chat import ChatTask, route
from tidal.server.errors import APIError
from tidal.server.images import image_source
from tidal.server.json_body import FastJSONRoute
from tidal.server.schemas import ChatBody
from tidal.server.state import ServerState, sse


def _settings(body: ChatBody, task: ChatTask) -> dict[str, Any] | None:
    if task.skill in ("detect", "point"):
        return None
    s: dict[str, Any] = {}
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    for key, value in (("max_tokens", max_tokens), ("temperature", body.temperature), ("top_p", body.top_p), ("top_k", body.top_k), ("stop", body.stop), ("seed", body.seed)):
        if value is not None:
            s[key] = value
    return s


def _content(task: ChatTask, result: dict[str, Any]) -> str:
    if task.skill in ("detect", "point"):
        return json.dumps(result)
    return result["caption"] if task.skill == "caption" else result["answer"]


def openai_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/v1", route_class=FastJSONRoute)
    md, config = state.md, state.config

    def submit_fn(task: ChatTask, settings: dict[str, Any] | None):
        def run() -> RequestHandle:
            img = None if task.image_url is None else image_source(task.image_url, config)
            if task.skill in ("query", "reason"):
                return md.submit_query(img, task.text, task.skill == "reason", None, settings)
            if task.skill == "caption":
                return md.submit_caption(img, task.text, settings)
            return (md.submit_detect if task.skill == "detect" else md.submit_point)(img, task.text, None)

        return run

    def usage(handle: RequestHandle) -> dict[str, int]:
        req = handle.request
        done = req.skill.completion_tokens
        return {"prompt_tokens": req.prompt_tokens, "completion_tokens": done, "total_tokens": req.prompt_tokens + done}

    @router.get("/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(state.started), "owned_by": "tidal"}]}

    @router.post("/chat/completions")
    async def chat(body: ChatBody, http: Request) -> Any:
        if body.n != 1:
            raise APIError(400, "n must be 1", "invalid_request_error")
        _refuse_unsupported(body)
        task = route(body.messages, body.reasoning)
        handle = await state.submit(task.skill, submit_fn(task, _settings(body, task)))
        rid, created = f"chatcmpl-{handle.request.id}", int(time.time())
        model = body.model or config.model_name
        if body.stream:
            return state.sse_response(handle, task.skill, _chunk_encoder(task, handle, rid, created, model, body, usage))
        result = await state.wait(handle, task.skill, http)
        message: dict[str, Any] = {"role": "assistant", "content": _content(task, result)}
        if "reasoning" in result:
            message["reasoning_content"] = result["reasoning"]["text"]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": handle.request.skill.finish_reason or "stop"}],
            "usage": usage(handle),
        }

    return router


def _refuse_unsupported(body: ChatBody) -> None:
    """OpenAI options this server cannot honour get a 400, never silent neglect."""
    refused = []
    if body.logprobs or body.top_logprobs is not None:
        refused.append("logprobs / top_logprobs")
    if body.tools or body.functions or body.tool_choice not in (None, "none") or body.function_call not in (None, "none"):
        refused.append("tools / functions")
    if body.response_format is not None and body.response_format.get("type") != "text":
        refused.append("response_format other than {'type': 'text'}")
    if body.logit_bias:
        refused.append("logit_bias")
    if body.presence_penalty or body.frequency_penalty:
        refused.append("presence_penalty / frequency_penalty")
    if refused:
        raise APIError(400, f"not supported by this server: {'; '.join(refused)}", "unsupported_parameter")


def _chunk_encoder(task: ChatTask, handle: RequestHandle, rid: str, created: int, model: str, body: ChatBody, usage):
    started = False

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def encode(kind: str, payload: Any) -> list[str]:
        nonlocal started
        lines = []
        if not started:
            started = True
            lines.append(chunk({"role": "assistant", "content": ""}))
        if kind == "text":
            lines.append(chunk({"content": payload}))
        elif kind == "reasoning":
            lines.append(chunk({"reasoning_content": payload["text"]}))
        elif kind == "done":
            if task.skill in ("detect", "point"):
                lines.append(chunk({"content": _content(task, payload)}))
            lines.append(chunk({}, handle.request.skill.finish_reason or "stop"))
            if body.stream_options is not None and body.stream_options.include_usage:
                lines.append(sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage(handle)}))
            lines.append("data: [DONE]\n\n")
        return lines

    return encode
