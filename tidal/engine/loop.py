"""EngineLoop: runs the Engine on a background thread; callers submit requests
from any thread and read their events from a RequestHandle."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

from tidal.engine.engine import Engine
from tidal.engine.request import Request

logger = logging.getLogger(__name__)

_DONE = "done"


class RequestError(RuntimeError):
    """The engine failed while running a request."""


class RequestCancelled(RequestError):
    """The request was cancelled before it finished."""


class RequestHandle:
    """The caller's side of one request: a stream of (kind, payload) events.

    Kinds: "text" (an answer chunk), "reasoning" (the finished reasoning),
    and a final "done". Iterating raises RequestError if the engine failed.
    """

    def __init__(self, req: Request, loop: "EngineLoop") -> None:
        self.request = req
        self._loop = loop
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._lock = threading.Lock()
        self.done = False

    # called on the engine thread
    def _push(self, kind: str, payload: Any) -> None:
        with self._lock:
            self._queue.put((kind, payload))
            alive = []
            for aloop, aq in self._listeners:
                try:
                    aloop.call_soon_threadsafe(aq.put_nowait, (kind, payload))
                    alive.append((aloop, aq))
                except RuntimeError:  # its event loop is closed: nobody is listening there
                    pass
            self._listeners = alive

    def events(self) -> Iterator[tuple[str, Any]]:
        """Blocking iterator over events, ending after "done"."""
        while True:
            kind, payload = self._queue.get()
            if kind == _DONE:
                self.done = True
                self._raise_if_failed()
                return
            yield kind, payload

    async def aevents(self) -> AsyncIterator[tuple[str, Any]]:
        """The same events for asyncio code (the server)."""
        aq: asyncio.Queue = asyncio.Queue()
        with self._lock:
            while not self._queue.empty():  # events that arrived before we listened
                aq.put_nowait(self._queue.get_nowait())
            self._listeners.append((asyncio.get_running_loop(), aq))
        while True:
            kind, payload = await aq.get()
            if kind == _DONE:
                self.done = True
                self._raise_if_failed()
                return
            yield kind, payload

    def _raise_if_failed(self) -> None:
        err = self.request.error
        if err is not None:
            raise RequestError(f"request {self.request.id} failed: {type(err).__name__}: {err}") from err

    def wait(self) -> dict:
        """Block until the request finishes; return its skill's result.
        Raises RequestCancelled if it was cancelled, RequestError if it failed."""
        for _ in self.events():
            pass
        if self.request.cancelled:
            raise RequestCancelled(f"request {self.request.id} was cancelled")
        return self.request.skill.result()

    def cancel(self) -> None:
        self._loop.cancel(self)


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._handles: dict[str, RequestHandle] = {}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.crashed: BaseException | None = None
        self._crash_lock = threading.Lock()
        self.snapshot: dict[str, int] = engine.snapshot()  # refreshed by the engine thread

    def queue_length(self) -> int:
        """Requests submitted but not yet running (read without locks: a close estimate)."""
        return self._inbox.qsize() + len(self.engine.scheduler.waiting)

    def in_flight(self) -> int:
        """Requests submitted and not yet finished."""
        return self._inbox.qsize() + len(self._handles)

    def submit(self, req: Request) -> RequestHandle:
        handle = RequestHandle(req, self)
        self._ensure_thread()
        with self._crash_lock:  # a crash drains the inbox under this lock: nothing slips in after
            if self.crashed is not None:
                raise RequestError(f"the engine loop stopped after an internal error ({type(self.crashed).__name__}); restart the model")
            self._inbox.put(("add", handle))
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        self._inbox.put(("cancel", handle))

    def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the engine thread, between steps; return its result."""
        done: Future = Future()
        self._ensure_thread()
        self._inbox.put(("call", (fn, done)))
        return done.result()

    def close(self) -> None:
        if self._thread is not None:
            self._inbox.put(("stop", None))
            self._thread.join()
            self._thread = None

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tidal-engine", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_work()
                while True:
                    try:
                        cmd, arg = self._inbox.get(block=block)
                    except queue.Empty:
                        break
                    block = False
                    if cmd == "stop":
                        self._fail_all(RequestError("engine loop closed"))
                        return
                    if cmd == "add":
                        self._handles[arg.request.id] = arg
                        self.engine.add_request(arg.request)
                    elif cmd == "cancel" and not arg.request.finished:
                        self.engine.abort(arg.request)
                        self._deliver([arg.request])
                    elif cmd == "call":
                        fn, done = arg
                        try:
                            done.set_result(fn(self.engine))
                        except Exception as exc:
                            done.set_exception(exc)
                self._deliver(self.engine.step())
                self.snapshot = self.engine.snapshot()
        except BaseException as exc:  # a bug in the engine: fail everyone, promptly and loudly
            logger.exception("engine loop crashed")
            with self._crash_lock:
                self.crashed = exc
                while True:  # requests submitted but not yet seen
                    try:
                        cmd, arg = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if cmd == "add":
                        self._handles[arg.request.id] = arg
                    elif cmd == "call":
                        arg[1].set_exception(RequestError("the engine loop stopped"))
            self._fail_all(exc)

    def _deliver(self, reqs: list[Request]) -> None:
        for req in reqs:
            handle = self._handles.get(req.id)
            if handle is None:
                continue
            try:
                for kind, payload in req.skill.drain_events():
                    handle._push(kind, payload)
            except Exception:  # a listener's failure is its own, never the engine's
                logger.exception("delivering events of %s failed", req.id)
            if req.finished:
                handle._push(_DONE, None)
                del self._handles[req.id]

    def _fail_all(self, exc: BaseException) -> None:
        """Finish every known request with `exc`; each step is guarded, since the
        engine may be what broke."""
        for handle in list(self._handles.values()):
            req = handle.request
            if not req.finished and req.error is None:
                req.error = exc
            try:
                if not req.finished:
                    self.engine.abort(req)
            except Exception:
                logger.exception("aborting %s failed", req.id)
            try:
                handle._push(_DONE, None)
            except Exception:
                logger.exception("failing %s failed", req.id)
        self._handles.clear()
