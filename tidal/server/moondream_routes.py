"""Moondream-compatible endpoints: the JSON of Moondream's own API, so the
official `moondream` client works unchanged (`md.vl(endpoint=".../v1")`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tidal.server.errors import APIError
from tidal.server.images import image_source
from tidal.server.json_body import FastJSONRoute
from tidal.server.schemas import CaptionBody, LocateBody, QueryBody
from tidal.server.state import ServerState, sse


def moondream_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/v1", route_class=FastJSONRoute)
    md, config = state.md, state.config

    def image(url: str | None):
        return None if url is None else image_source(url, config)

    def stream_response(handle, skill: str) -> StreamingResponse:
        def encode(kind: str, payload: Any) -> list[str]:
            if kind == "text":
                return [sse({"chunk": payload})]
            if kind == "reasoning":
                return [sse({"reasoning": payload})]
            if kind == "done":
                return [sse({"completed": True, "request_id": handle.request.id, "finish_reason": handle.request.skill.finish_reason})]
            return []

        return state.sse_response(handle, skill, encode)

    @router.post("/caption")
    async def caption(body: CaptionBody, http: Request) -> Any:
        handle = await state.submit("caption", lambda: md.submit_caption(image(body.image_url), body.length, body.settings))
        if body.stream:
            return stream_response(handle, "caption")
        return {"request_id": handle.request.id, **await state.wait(handle, "caption", http)}

    @router.post("/query")
    async def query(body: QueryBody, http: Request) -> Any:
        skill = "reason" if body.reasoning else "query"
        handle = await state.submit(skill, lambda: md.submit_query(image(body.image_url), body.question, body.reasoning, body.spatial_refs, body.settings))
        if body.stream:
            return stream_response(handle, skill)
        return {"request_id": handle.request.id, **await state.wait(handle, skill, http)}

    @router.post("/detect")
    async def detect(body: LocateBody, http: Request) -> Any:
        _no_refs(body, "detect")
        handle = await state.submit("detect", lambda: md.submit_detect(image(body.image_url), body.object, body.settings))
        return {"request_id": handle.request.id, **await state.wait(handle, "detect", http)}

    @router.post("/point")
    async def point(body: LocateBody, http: Request) -> Any:
        _no_refs(body, "point")
        handle = await state.submit("point", lambda: md.submit_point(image(body.image_url), body.object, body.settings))
        return {"request_id": handle.request.id, **await state.wait(handle, "point", http)}

    @router.post("/segment")
    async def segment() -> Any:
        raise APIError(400, "segment is not a Moondream 3 skill; use detect or point", "unsupported_skill")

    return router


def _no_refs(body: LocateBody, skill: str) -> None:
    if body.spatial_refs:
        raise APIError(400, f"{skill} takes no spatial_refs in Moondream 3; use query with spatial_refs", "invalid_request_error")
