"""EngineConfig.overlap: the next decode step queued behind the running one.

While a decode step's graph runs, the engine launches the step after it, each
sequence feeding what the running step outputs for it (the sampled token, or
for detect, point and reasoning's grounding the coordinate or size; the
runner reads it on the device), before it reads the running step's results. Once they are read and
applied, each guessed row is kept if its request's skill asked for exactly
that input and OutputSpec, else dropped and its KV slot given back.
Functions of the engine (its scheduler, allocator, table, runner, stats)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tidal.core import (
    FEED_COORD,
    FEED_NOTHING,
    FEED_SAMPLED,
    FEED_SIZE,
    FEED_TOKEN,
    FINISHES,
    CoordInput,
    Guess,
    InputItem,
    SeqStep,
    SizeInput,
    StepResult,
    rope_delta,
)
from tidal.engine.request import Request, RequestStatus
from tidal.engine.scheduler import Chunk
from tidal.runner.model_runner import Launched

if TYPE_CHECKING:
    from tidal.engine.engine import Engine

logger = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """A launched step: its chunks, their SeqSteps, the runner's handle, and
    which chunks still count (a guessed one proved wrong is dropped)."""

    chunks: list[Chunk]
    steps: list[SeqStep]
    launched: Launched
    live: list[bool]
    ahead: bool = False  # launched before its predecessor's results were read
    feeds: list[int] | None = None  # a step launched ahead: each row's Guess.feed

    def any_live(self) -> bool:
        """Whether some chunk still counts for a running request."""
        return any(live and c.req.status is RequestStatus.RUNNING for c, live in zip(self.chunks, self.live))


def overlap_on(engine: "Engine") -> bool:
    """EngineConfig.overlap: None means where the step ahead replays a graph."""
    on = engine.config.overlap
    return on if on is not None else engine.runner.graphs is not None and not engine.config.trace_logits


def launch_ahead(engine: "Engine", current: LaunchedStep) -> LaunchedStep | None:
    """Queue the step after `current` before its results are read, when that
    step is certain to be asked for unless a guess fails: every running
    request is in `current`, finishing its inputs there, and its skill says
    what of that output it will feed back (Skill.guess_next: the token, a
    coordinate or a size, with the OutputSpec it names) or that the output is
    its last (left out); no request waits that a free table row would admit;
    a free slot each. -> the launched step, its chunks feeding placeholders
    the device fills."""
    sched = engine.scheduler
    if sched.waiting and engine.req_to_token.available:
        return None  # it would be admitted by the next schedule: let it (with no free row it waits anyway)
    chunks = [c for c, live in zip(current.chunks, current.live) if live and c.req.status is RequestStatus.RUNNING]
    if not chunks or len(chunks) != len(sched.running) or engine.allocator.available < len(chunks):
        return None
    guesses: list[Guess] = []
    for c in chunks:
        req = c.req
        if not c.completes or req.cancelled:
            return None
        if req.num_cached >= engine.max_context:  # no position left: it stops with this output
            guesses.append(FINISHES)
            continue
        try:
            guess = req.skill.guess_next()
        except Exception:  # a skill bug: its request fails where the step is scheduled as usual
            logger.exception("skill %s failed naming its next output on %s", req.skill.name, req.id)
            return None
        if guess is None or guess.feed not in _PLACEHOLDER and guess.feed != FEED_NOTHING:
            return None
        guesses.append(guess)
    guessed = [(c, g) for c, g in zip(chunks, guesses) if g.feed != FEED_NOTHING]  # the rest finish with this output
    if not guessed or sched.waiting and len(guessed) < len(chunks):
        return None  # (a request finishing frees a table row: the next schedule admits a waiting one)
    chunks = [c for c, _ in guessed]
    index = {id(c): i for i, c in enumerate(current.chunks)}
    steps, source, feeds = [], [], []
    for c, guess in guessed:
        req = c.req
        slot = engine.allocator.alloc(1)
        assert slot is not None
        start = req.num_cached
        engine.req_to_token.write(req.row, start, slot)  # type: ignore[arg-type]
        req.slots.extend(slot)
        req.ahead += 1
        item = _PLACEHOLDER[guess.feed]
        feeds.append(guess.feed)
        steps.append(SeqStep(req.row, start, [item], req.bidir_len, guess.spec, req.rope_delta + rope_delta(req.pending[: c.n_items])))  # type: ignore[arg-type]
        source.append(index[id(c)])
    try:
        launched = engine.runner.launch(steps, trace=engine.config.trace_logits, feed=(current.launched, source, feeds))
    except Exception:
        logger.exception("launching a step ahead failed; the step is scheduled as usual")
        for c in chunks:
            take_back(engine, c.req)
        return None
    engine.stats.ahead_steps += 1
    return LaunchedStep([Chunk(c.req, 1, 1) for c in chunks], steps, launched, [True] * len(chunks), ahead=True, feeds=feeds)


def confirm(engine: "Engine", ahead: LaunchedStep, current: LaunchedStep, results: list) -> LaunchedStep | None:
    """With `current`'s results applied: keep the step launched ahead for each
    request whose skill asked for what it guessed (the sampled token as its
    one input, the OutputSpec named: what the device fed, to the last bit);
    give back the slot of any other still running. -> the step, or None if
    nothing in it counts."""
    by_req = {id(c.req): r for c, r in zip(current.chunks, results)}
    assert ahead.feeds is not None
    for i, (chunk, step, kind) in enumerate(zip(ahead.chunks, ahead.steps, ahead.feeds)):
        req = chunk.req
        if req.status is not RequestStatus.RUNNING:
            ahead.live[i] = False  # its slots went back with it
            continue
        result = by_req.get(id(req))
        try:
            fed = engine.runner.fed_item(kind, result) if isinstance(result, StepResult) else None
            same = fed is not None and len(req.pending) == 1 and type(req.pending[0]) is type(fed) and req.pending[0] == fed and req.skill.next_output() == step.output
        except Exception:  # a skill bug: dropped here, its request fails in the step scheduled as usual
            same = False
        if not same:
            ahead.live[i] = False
            take_back(engine, req)
            engine.stats.ahead_dropped += 1
    return ahead if any(ahead.live) else None


# the item a guessed row carries until the device writes what it feeds (FEED_SAMPLED: a token,
# unless the device finds the model feeds something else for the one sampled)
_PLACEHOLDER: dict[int, InputItem] = {FEED_TOKEN: 0, FEED_COORD: CoordInput(0.0), FEED_SIZE: SizeInput(0.0, 0.0), FEED_SAMPLED: 0}


def drop(engine: "Engine", ahead: LaunchedStep) -> None:
    """Give back the slots of every live row of a step launched ahead that will not be read."""
    for c, live in zip(ahead.chunks, ahead.live):
        if live and c.req.status is RequestStatus.RUNNING:
            take_back(engine, c.req)


def take_back(engine: "Engine", req: Request) -> None:
    """Return the slot a step launched ahead took for req (its K/V written
    there, if the step runs, is never read: the slot's next owner writes it
    first, later on the same stream)."""
    engine.allocator.free([req.slots.pop()])
    req.ahead -= 1
