"""OpenAI-compatible routes for models served through tidal.LLM:
`/v1/completions`, `/v1/chat/completions` (text, and image parts for a model
that sees images, video parts, as animated images, for one that sees videos),
`/v1/models`. Moondream's own endpoints answer 404 saying why."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from tidal.engine.loop import RequestHandle
from tidal.engine.sampling import SamplingParams
from tidal.images import animation_frames
from tidal.llm import LLM
from tidal.server.errors import APIError
from tidal.server.images import image_bytes, image_source
from tidal.server.json_body import FastJSONRoute
from tidal.server.schemas import ChatBody, CompletionBody, ImagePart, VideoPart
from tidal.server.state import ServerState, sse

MOONDREAM_ONLY = ("query", "caption", "detect", "point", "segment")


def _params(body: Any, default_max_tokens: int | None) -> SamplingParams:
    """OpenAI's defaults (temperature 1, top_p 1) where the body is silent;
    max_tokens None runs to the context (counted once the images are known)."""
    stop = body.stop
    max_tokens = getattr(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = body.max_tokens if body.max_tokens is not None else default_max_tokens
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        max_tokens=max_tokens,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        seed=body.seed,
    )


def _refuse(body: Any) -> None:
    refused = [name for name in ("logprobs", "top_logprobs", "tools", "functions", "logit_bias", "presence_penalty", "frequency_penalty") if getattr(body, name, None)]
    if getattr(body, "echo", False):
        refused.append("echo")
    if getattr(body, "response_format", None) is not None and body.response_format.get("type") != "text":
        refused.append("response_format other than {'type': 'text'}")
    if body.n != 1:
        refused.append("n other than 1")
    if refused:
        raise APIError(400, f"not supported by this server: {', '.join(refused)}", "unsupported_parameter")


def _usage(handle: RequestHandle) -> dict[str, int]:
    req = handle.request
    done = req.skill.completion_tokens
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": done, "total_tokens": req.prompt_tokens + done}


def llm_router(state: ServerState, llm: LLM) -> APIRouter:
    router = APIRouter(prefix="/v1", route_class=FastJSONRoute)
    config = state.config

    @router.get("/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(state.started), "owned_by": "tidal"}]}

    for name in MOONDREAM_ONLY:

        @router.post(f"/{name}", name=f"not_{name}")
        async def moondream_only(http: Request) -> Any:
            raise APIError(404, f"{http.url.path} is Moondream 3's API; this server runs {config.model_name} ({type(llm.model).__name__}): use /v1/chat/completions or /v1/completions", "not_found")

    @router.post("/completions")
    async def completions(body: CompletionBody, http: Request) -> Any:
        _refuse(body)
        request = {"prompt": body.prompt} if isinstance(body.prompt, str) else {"prompt_token_ids": body.prompt}
        params = _params(body, 16)  # OpenAI's default for completions
        handle = await state.submit("completion", lambda: llm.submit(request, params, body.ignore_eos))
        return await _respond(state, handle, body, http, "text_completion", "cmpl")

    @router.post("/chat/completions")
    async def chat(body: ChatBody, http: Request) -> Any:
        _refuse(body)
        if llm.chat_template is None:
            raise APIError(400, f"{config.model_name} has no chat template: use /v1/completions", "invalid_request_error")
        sees_images = hasattr(llm.model, "image_tokens")
        sees_videos = hasattr(llm.model, "prepare_video")
        messages, urls, video_urls = [], [], []
        for m in body.messages:
            if isinstance(m.content, list):
                if not sees_images and any(isinstance(p, ImagePart) for p in m.content):
                    raise APIError(400, f"{config.model_name} is a text model: image parts are not accepted", "invalid_request_error")
                if not sees_videos and any(isinstance(p, VideoPart) for p in m.content):
                    raise APIError(400, f"{config.model_name} takes no videos: video_url parts are not accepted", "invalid_request_error")
                parts = []
                for p in m.content:
                    if isinstance(p, ImagePart):
                        urls.append(p.image_url if isinstance(p.image_url, str) else p.image_url.url)
                        parts.append({"type": "image"})
                    elif isinstance(p, VideoPart):
                        video_urls.append(p.video_url if isinstance(p.video_url, str) else p.video_url.url)
                        parts.append({"type": "video"})
                    else:
                        parts.append({"type": "text", "text": p.text})
                messages.append({"role": m.role, "content": parts if sees_images else "".join(p["text"] for p in parts)})
            else:
                messages.append({"role": m.role, "content": m.content or ""})
        prompt = llm.chat_template.render(messages, add_generation_prompt=True)
        params = _params(body, None)

        def submit() -> RequestHandle:  # off the event loop: images are fetched and decoded here
            request: dict[str, Any] = {"prompt": prompt}
            if urls:
                request["images"] = [image_source(u, config) for u in urls]
            if video_urls:
                videos = [animation_frames(image_bytes(u, config, "video_url")) for u in video_urls]
                request["videos"] = [{"frames": frames, "fps": fps} if fps is not None else frames for frames, fps in videos]
            return llm.submit(request, params)

        handle = await state.submit("chat", submit)
        return await _respond(state, handle, body, http, "chat.completion", "chatcmpl")

    return router


async def _respond(state: ServerState, handle: RequestHandle, body: Any, http: Request, kind: str, prefix: str) -> Any:
    rid, created, model = f"{prefix}-{handle.request.id}", int(time.time()), body.model or state.config.model_name
    chat = kind == "chat.completion"
    skill = "chat" if chat else "completion"

    def choice(text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if delta:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

    if body.stream:
        object_name = "chat.completion.chunk" if chat else "text_completion"

        def encode(event: str, payload: Any) -> list[str]:
            def line(c: dict[str, Any]) -> str:
                return sse({"id": rid, "object": object_name, "created": created, "model": model, "choices": [c]})

            if event == "text":
                return [line(choice(payload, None, True))]
            if event != "done":
                return []
            out = [line(choice(None if chat else "", handle.request.skill.finish_reason or "stop", True))]
            if body.stream_options is not None and body.stream_options.include_usage:
                out.append(sse({"id": rid, "object": object_name, "created": created, "model": model, "choices": [], "usage": _usage(handle)}))
            return out + ["data: [DONE]\n\n"]

        return state.sse_response(handle, skill, encode)
    result = await state.wait(handle, skill, http)
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice(result["text"], result["finish_reason"] or "stop", False)], "usage": _usage(handle)}
