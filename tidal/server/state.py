"""What every route shares: admission (queue bound), waiting or streaming with
cancellation on disconnect, and per-request metrics and logs."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.to_thread
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from tidal.api import Moondream
from tidal.engine.loop import RequestError, RequestHandle
from tidal.llm import LLM
from tidal.server.config import ServerConfig
from tidal.server.errors import APIError
from tidal.server.metrics import Metrics

request_log = logging.getLogger("tidal.requests")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


# benchmarks/gil_handover.py (2-core box): an engine-like thread waited 25.2 ms (mean) for the GIL beside
# two threads decoding base64 with binascii at the default 5 ms, 3.9 ms at 1 ms; with the server's
# decoder (tidal.base64_decode, GIL released) 0.2 ms at either
SWITCH_INTERVAL_S = 0.001


class ServerState:
    def __init__(self, md: Moondream | LLM, config: ServerConfig) -> None:
        self.md = md
        self.config = config
        self.metrics = Metrics(md.loop)
        self.started = time.time()
        self._accepting = 0  # accepted, not yet in the engine's queue (event-loop thread only)
        if config.request_threads is not None and config.request_threads < 1:
            raise ValueError(f"request_threads must be at least 1, not {config.request_threads}")
        self._limiter = None if config.request_threads is None else anyio.CapacityLimiter(config.request_threads)
        if isinstance(md, Moondream):
            md.max_image_pixels = config.max_image_pixels
        # Request threads (decoding, hashing) and the event loop share the GIL with the
        # engine's thread, which must get it back as soon as its GPU step returns: a
        # waiting thread asks for it after the switch interval (5 ms by default).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))

    async def submit(self, skill: str, submit: Callable[[], RequestHandle]) -> RequestHandle:
        """Check the queue bound, then validate and submit off the event loop
        (decoding and cropping images is CPU work). A request counts against
        the bound from here on: while its image decodes (`_accepting`), then in
        the engine's queue."""
        waiting = self._accepting + self.md.loop.queue_length()
        if waiting >= self.config.max_queue:
            self.metrics.rejected(skill, "overloaded")
            raise APIError(
                503,
                f"the server is at capacity ({waiting} requests waiting); retry in {self.config.retry_after_s} s",
                "overloaded",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        self._accepting += 1
        t0 = time.perf_counter()
        try:
            return await anyio.to_thread.run_sync(submit, limiter=self._limiter)  # None: anyio's default pool
        except ValueError:
            self.metrics.rejected(skill, "invalid")
            raise
        finally:
            self._accepting -= 1  # submitted requests are in the engine's queue by now
            self.metrics.prepare.labels(skill).observe(time.perf_counter() - t0)

    async def wait(self, handle: RequestHandle, skill: str, http: HTTPRequest) -> dict[str, Any]:
        """The request's result; a client that goes away cancels it."""
        watcher = asyncio.create_task(_cancel_on_disconnect(http, handle))
        try:
            async for _ in handle.aevents():
                pass
        except RequestError as exc:
            self._done(handle, skill, "error")
            raise APIError(500, internal_error_message(handle), "server_error") from exc
        finally:
            watcher.cancel()
        status = "cancelled" if handle.request.cancelled else "ok"
        self._done(handle, skill, status)
        if handle.request.cancelled:
            raise APIError(499, "request cancelled", "cancelled")
        return handle.request.skill.result()

    async def stream(self, handle: RequestHandle, skill: str, encode: Callable[[str, Any], list[str]]) -> AsyncIterator[str]:
        """SSE lines for each event; `encode(kind, payload)` maps an event (and
        the final ("done", result)) to lines. Leaving early cancels the request."""
        status = "cancelled"
        try:
            async for kind, payload in handle.aevents():
                for line in encode(kind, payload):
                    yield line
            status = "cancelled" if handle.request.cancelled else "ok"
            for line in encode("done", handle.request.skill.result()):
                yield line
        except RequestError:
            status = "error"
            yield sse({"error": {"message": internal_error_message(handle), "type": "server_error"}})
        finally:
            if not handle.done:
                handle.cancel()
            self._done(handle, skill, status)

    def sse_response(self, handle: RequestHandle, skill: str, encode: Callable[[str, Any], list[str]]) -> StreamingResponse:
        """A server-sent-events response over `stream`."""
        return StreamingResponse(self.stream(handle, skill, encode), media_type="text/event-stream", headers=_SSE_HEADERS)

    def _done(self, handle: RequestHandle, skill: str, status: str) -> None:
        req = handle.request
        self.metrics.finished(req, skill, status)
        end = req.finished_at or time.monotonic()
        request_log.info(
            json.dumps(
                {
                    "id": req.id,
                    "skill": skill,
                    "status": status,
                    "finish_reason": req.skill.finish_reason,
                    "prompt_tokens": req.prompt_tokens,
                    "cached_tokens": req.cached_prompt_tokens,
                    "completion_tokens": req.skill.completion_tokens,
                    "ttft_ms": None if req.first_output_at is None else round((req.first_output_at - req.arrival) * 1000, 1),
                    "ms": round((end - req.arrival) * 1000, 1),
                }
            )
        )


def internal_error_message(handle: RequestHandle) -> str:
    """What a client learns of a failure inside the engine: no internals (the log has them)."""
    return f"internal error while running request {handle.request.id}; the server log has the details"


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _cancel_on_disconnect(http: HTTPRequest, handle: RequestHandle) -> None:
    while not handle.done:
        if await http.is_disconnected():
            handle.cancel()
            return
        await asyncio.sleep(0.05)
