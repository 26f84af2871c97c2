"""Scheduler: admission by free KV pages, chunked prefill under a token budget,
and preemption (release now, recompute later) when pages run out."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from tidal.cache.kv_pool import ReqToTokenPool, SlotAllocator
from tidal.engine.inputs import item_len
from tidal.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)

# A running request with at most this many pending positions is decoding;
# decodes are scheduled before any prefill chunk so they never stall.
_DECODE_MAX = 2


@dataclass
class Chunk:
    """Feed the first `n_items` pending items of `req` this step."""

    req: Request
    n_items: int
    n_positions: int

    @property
    def completes(self) -> bool:
        return self.n_items == len(self.req.pending)


class Scheduler:
    def __init__(self, allocator: SlotAllocator, req_to_token: ReqToTokenPool, token_budget: int) -> None:
        self.allocator = allocator
        self.req_to_token = req_to_token
        self.token_budget = token_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- admission -------------------------------------------------------
    def _admit(self) -> None:
        committed = sum(r.pending_len for r in self.running)
        while self.waiting and self.req_to_token.available:
            req = self.waiting[0]
            need = req.pending_len
            if self.running and self.allocator.available - committed < need:
                break  # wait for pages; an idle engine admits anything that fits at all
            self.waiting.popleft()
            req.row = self.req_to_token.alloc()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            committed += need

    # -- one step --------------------------------------------------------
    def schedule(self) -> list[Chunk]:
        """Pick this step's work and give it KV slots (preempting if needed)."""
        self._admit()
        decodes = [r for r in self.running if r.pending_len <= _DECODE_MAX and r.history]
        prefills = [r for r in self.running if not (r.pending_len <= _DECODE_MAX and r.history)]
        budget = self.token_budget
        chunks: list[Chunk] = []
        for req in decodes + prefills:
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            chunk = self._chunk(req, budget, first=not chunks)
            if chunk is None:
                continue
            if not self._reserve(req, chunk.n_positions, chunks):
                continue
            chunks.append(chunk)
            budget -= chunk.n_positions
        return chunks

    def _chunk(self, req: Request, budget: int, first: bool) -> Chunk | None:
        """The longest prefix of req.pending within budget; the bidirectional
        prefix is never split, and the first chunk of a step may exceed the
        budget by one atomic item so that every step makes progress."""
        pos = req.num_cached
        n_items = n_pos = 0
        for item in req.pending:
            size = item_len(item)
            must_take = n_items == 0 or pos + n_pos < req.bidir_len
            if n_pos + size > budget and not (must_take and first):
                if must_take:
                    return None
                break
            n_items += 1
            n_pos += size
        return Chunk(req, n_items, n_pos) if n_items else None

    def _reserve(self, req: Request, n: int, scheduled: list[Chunk]) -> bool:
        """Give req n more slots, preempting the newest other requests if needed."""
        busy = {c.req for c in scheduled} | {req}
        while self.allocator.available < n:
            victim = next((r for r in reversed(self.running) if r not in busy), None)
            if victim is None:
                break
            self.preempt(victim)
        slots = self.allocator.alloc(n)
        if slots is None:
            if req is not self.running[0] or scheduled:
                self.preempt(req)
                return False
            raise CacheFullError(f"request {req.id} needs {req.num_cached + n} KV pages; the cache holds {self.allocator.capacity}")
        start = req.num_cached
        self.req_to_token.table[req.row, start : start + n] = self.req_to_token.table.new_tensor(slots)
        req.slots.extend(slots)
        return True

    # -- leaving the running set -----------------------------------------
    def preempt(self, req: Request) -> None:
        """Drop req's cache; it re-queues first and later recomputes what it had fed."""
        logger.info("preempting %s (%d cached positions)", req.id, req.num_cached)
        self._release(req)
        req.pending = req.history + req.pending
        req.history = []
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def remove(self, req: Request) -> None:
        if req.status is RequestStatus.RUNNING:
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED

    def _release(self, req: Request) -> None:
        self.running.remove(req)
        self.allocator.free(req.slots)
        req.slots = []
        if req.row is not None:
            self.req_to_token.free(req.row)
            req.row = None


class CacheFullError(RuntimeError):
    """A lone request does not fit in the whole KV cache."""
