"""A request's state inside the engine."""

from __future__ import annotations

import itertools
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum

from tidal.core import InputItem, items_len
from tidal.engine.prefix_keys import position_keys
from tidal.engine.skill import Skill

_ids = itertools.count()


class RequestStatus(Enum):
    WAITING = "waiting"  # queued, holds no cache
    RUNNING = "running"  # holds a table row and KV slots
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation: its skill state machine plus what it has fed and will feed.

    history: items whose K/V are in the cache, in position order.
    pending: items to feed next; the skill's output is wanted after the last.
    bidir_len: leading positions that attend bidirectionally (BOS + image).
    slots: KV slot of each cached position; the first `shared_len` belong to
        the prefix cache (locked through `cache_node`), the rest to this request.
    keys: prefix-cache keys of the prompt positions.
    """

    skill: Skill
    pending: list[InputItem]
    bidir_len: int
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    history: list[InputItem] = field(default_factory=list)
    rope_delta: int = 0  # tidal.core.rope_delta(history), kept as history changes
    status: RequestStatus = RequestStatus.WAITING
    row: int | None = None
    slots: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    keys: list[Hashable] = field(default_factory=list)
    shared_len: int = 0
    cache_node: object | None = None
    cached_prompt_tokens: int = 0  # prompt positions served by the prefix cache
    error: BaseException | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_output_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    preemptions: int = 0  # times this request was preempted (and later recomputed)
    submitted: bool = False  # given to an engine (a Request runs once, in one engine)
    trace: list = field(default_factory=list)  # OutputTrace per output, with EngineConfig.trace_logits
    ahead: int = 0  # slots (at the end of `slots`) of steps launched ahead whose positions are not yet in `history` (EngineConfig.overlap)

    def __post_init__(self) -> None:
        self.prompt_tokens = items_len(self.pending)
        self.keys = position_keys(self.pending, self.bidir_len)

    @property
    def num_cached(self) -> int:
        """Positions whose K/V are in the cache (== len(self.slots))."""
        return len(self.slots)

    @property
    def pending_len(self) -> int:
        return items_len(self.pending)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
