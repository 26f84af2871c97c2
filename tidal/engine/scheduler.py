"""Scheduler: admission by free KV pages, prefix-cache reuse, chunked prefill
under a token budget, and preemption (release now, recompute later)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from tidal.cache.kv_pool import ReqToTokenPool, SlotAllocator
from tidal.cache.radix import RadixCache
from tidal.core import item_len, rope_delta
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


class CacheFullError(RuntimeError):
    """A lone request does not fit in the whole KV cache."""


class Scheduler:
    def __init__(self, allocator: SlotAllocator, req_to_token: ReqToTokenPool, token_budget: int, prefix_cache: RadixCache | None) -> None:
        self.allocator = allocator
        self.req_to_token = req_to_token
        self.token_budget = token_budget
        self.cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        """Queue a new request. A Request object runs once: adding it again
        (while it runs, or after it finished) would put two entries of one
        request in the queues, and the second would hold a table row forever."""
        if req.submitted:
            raise ValueError(f"request {req.id} was already submitted ({req.status.value}); make a new Request to run it again")
        req.submitted = True
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def free_pages(self) -> int:
        """Pages available now, counting cached pages no running request uses."""
        return self.allocator.available + (self.cache.evictable if self.cache else 0)

    # -- admission -------------------------------------------------------
    def _admit(self) -> None:
        committed = sum(r.pending_len for r in self.running)
        free = self.free_pages() if self.waiting else 0
        # Image prefixes being computed right now: a request on the same image
        # waits a step and then reuses that prefix instead of computing it again.
        computing = {key for r in self.running if (key := self._uncomputed_image(r)) is not None}
        deferred = []
        while self.waiting and self.req_to_token.available:
            req = self.waiting[0]
            if self._uncomputed_image(req) in computing:
                deferred.append(self.waiting.popleft())
                continue
            row = self.req_to_token.alloc()
            assert row is not None
            req.row = row
            self._reuse_prefix(req)
            need = req.pending_len
            if self.running and free - committed < need:
                self._drop_prefix(req)  # wait for pages; an idle engine admits anything that fits at all
                self.req_to_token.free(row)
                req.row = None
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            committed += need
            if self.cache is not None:
                self.cache.record_lookup(min(len(req.keys), req.prompt_tokens), req.shared_len)
            if (key := self._uncomputed_image(req)) is not None:
                computing.add(key)
        self.waiting.extendleft(reversed(deferred))  # back at the front, in order

    def _uncomputed_image(self, req: Request) -> Hashable | None:
        """With the prefix cache on: the key of req's image prefix while it is not yet computed."""
        if self.cache is None or not req.bidir_len or req.num_cached >= req.bidir_len:
            return None
        return req.keys[req.bidir_len - 1]

    def _reuse_prefix(self, req: Request) -> None:
        """Point req at the longest cached prefix of its prompt (whole items only,
        never part of the bidirectional prefix, always leaving one item to feed)."""
        if self.cache is None or not req.keys:
            return
        items = req.pending
        slots, _ = self.cache.match(req.keys)
        limit, n_items, pos = len(slots), 0, 0
        while n_items < len(items) - 1 and pos + item_len(items[n_items]) <= limit:
            pos += item_len(items[n_items])
            n_items += 1
        if pos < req.bidir_len:
            pos, n_items = 0, 0
        if pos == 0:
            return
        slots, node = self.cache.match(req.keys[:pos])
        self.cache.lock(node)
        req.cache_node, req.shared_len, req.slots = node, pos, list(slots)
        req.cached_prompt_tokens = max(req.cached_prompt_tokens, pos)
        req.history, req.pending = items[:n_items], items[n_items:]
        req.rope_delta = rope_delta(req.history)
        self.req_to_token.write(req.row, 0, slots)

    def _drop_prefix(self, req: Request) -> None:
        """Undo _reuse_prefix for a request that stays waiting."""
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)  # type: ignore[union-attr]
            req.pending = req.history + req.pending
            req.history, req.slots, req.shared_len, req.cache_node = [], [], 0, None
            req.rope_delta = 0

    # -- one step --------------------------------------------------------
    def schedule(self) -> list[Chunk]:
        """Pick this step's work and give it KV slots (evicting or preempting if needed)."""
        self._admit()
        decoding: list[Request] = []
        prefilling: list[Request] = []
        for r in self.running:  # one pass: pending_len sums the request's items
            (decoding if r.history and r.pending_len <= _DECODE_MAX else prefilling).append(r)
        budget = self.token_budget
        chunks: list[Chunk] = []
        prefill_started = False
        for i, req in enumerate(decoding + prefilling):
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            # Decodes always run; the first prefill chunk may overrun the budget
            # by one atomic item (an image prefix), so prefills always progress.
            is_decode = i < len(decoding)
            chunk = self._chunk(req, budget, may_overrun=is_decode or not prefill_started)
            if chunk is None or not self._reserve(req, chunk.n_positions, chunks):
                continue
            chunks.append(chunk)
            budget -= chunk.n_positions
            prefill_started |= not is_decode
        return chunks

    def _chunk(self, req: Request, budget: int, may_overrun: bool) -> Chunk | None:
        """The longest prefix of req.pending within budget; the bidirectional
        prefix is never split. With may_overrun, the first atomic unit is taken
        even past the budget."""
        pos = req.num_cached
        n_items = n_pos = 0
        for item in req.pending:
            size = item_len(item)
            must_take = n_items == 0 or pos + n_pos < req.bidir_len
            if n_pos + size > budget and not (must_take and may_overrun):
                if must_take:
                    return None
                break
            n_items += 1
            n_pos += size
        return Chunk(req, n_items, n_pos) if n_items else None

    def _reserve(self, req: Request, n: int, scheduled: list[Chunk]) -> bool:
        """Give req n more slots: from free pages, then evicting unused cached
        prefixes, then preempting the newest other running requests."""
        if self.allocator.available < n and self.cache is not None:
            self.cache.evict(n - self.allocator.available)
        busy = {c.req for c in scheduled} | {req} if self.allocator.available < n else set()
        while self.allocator.available < n:
            victim = next((r for r in reversed(self.running) if r not in busy), None)
            if victim is None:
                break
            self.preempt(victim)
            if self.cache is not None:
                self.cache.evict(n - self.allocator.available)
        slots = self.allocator.alloc(n)
        if slots is None:
            if req is not self.running[0] or scheduled:
                self.preempt(req)
                return False
            raise CacheFullError(f"request {req.id} needs {req.num_cached + n} KV pages; the cache holds {self.allocator.capacity}")
        start = req.num_cached
        self.req_to_token.write(req.row, start, slots)
        req.slots.extend(slots)
        return True

    # -- after a step ------------------------------------------------------
    def cache_prompt(self, req: Request) -> None:
        """Put req's computed prompt positions into the prefix cache and share them.

        Positions someone else cached meanwhile switch to the cache's copy and
        req's duplicates are freed; req then locks the deeper node.
        """
        if self.cache is None or req.row is None:
            return
        n = min(req.num_cached, len(req.keys))
        if n <= req.shared_len or (req.bidir_len and n < req.bidir_len):
            return
        present, slots, node = self.cache.insert(req.keys[:n], req.slots[:n])
        dup = req.slots[req.shared_len : present]
        if dup:
            self.allocator.free(dup)
            req.slots[req.shared_len : present] = slots[req.shared_len : present]
            self.req_to_token.write(req.row, req.shared_len, slots[req.shared_len : present])
        self.cache.lock(node)
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)  # type: ignore[arg-type]
        req.cache_node, req.shared_len = node, n

    # -- leaving the running set -----------------------------------------
    def preempt(self, req: Request) -> None:
        """Drop req's cache; it re-queues first and later recomputes what it had fed."""
        logger.info("preempting %s (%d cached positions)", req.id, req.num_cached)
        self._release(req)
        req.pending = req.history + req.pending
        req.history, req.rope_delta = [], 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        req.preemptions += 1

    def remove(self, req: Request) -> None:
        if req.status is RequestStatus.RUNNING:
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED

    def _release(self, req: Request) -> None:
        self.running.remove(req)
        self.allocator.free(req.slots[req.shared_len :])
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)  # type: ignore[union-attr]
        req.slots, req.shared_len, req.cache_node, req.ahead = [], 0, None, 0
        if req.row is not None:
            self.req_to_token.free(req.row)
            req.row = None

    def pages_in_use(self) -> int:
        """Pages owned by running requests (excluding shared cached prefixes)."""
        return sum(len(r.slots) - r.shared_len for r in self.running)

