"""The engine-facing protocol of a skill: a state machine over one request.

The engine feeds the request's inputs, and whenever the last fed input's
output is ready it hands the skill a StepResult; the skill answers with the
next inputs to feed, or None when the request is done.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from tidal.core import FEED_TOKEN, FINISHES, Guess, InputItem, OutputSpec, StepResult


class Skill(ABC):
    name: str = "skill"

    def __init__(self) -> None:
        self.finish_reason: str | None = None  # "stop", "length", ...
        self._events: list[tuple[str, Any]] = []
        self.completion_tokens = 0

    @abstractmethod
    def next_output(self) -> OutputSpec:
        """How the output of the next fed input is to be computed."""

    @abstractmethod
    def on_output(self, out: StepResult) -> list[InputItem] | None:
        """Consume an output; return the next inputs, or None when finished."""

    @abstractmethod
    def result(self) -> dict[str, Any]:
        """The final result, in the shape the Python API returns."""

    def spec_after_token(self) -> OutputSpec | None:
        """If this skill, handed a token output next, will ask for exactly that
        token to be fed back (unless it finishes), the OutputSpec it will then
        ask for; else None. Lets the engine queue that step before the output
        is read (EngineConfig.overlap); a wrong answer costs a wasted row,
        never a wrong result. None by default."""
        return None

    def last_output_next(self) -> bool:
        """Whether the next output is certainly this skill's last (it reaches
        its length limit): a step queued ahead leaves its request out. False
        by default."""
        return False

    def guess_next(self) -> Guess | None:
        """What this skill will feed back after its next output unless it
        finishes (its token, coordinate or size), and the OutputSpec it will
        then ask for; FINISHES if that output is certainly its last; None
        where that depends on more than the output. By default
        last_output_next, then the token as spec_after_token says. Skills
        that feed back coordinates or sizes (detect, point, reasoning's
        grounding) override this."""
        if self.last_output_next():
            return FINISHES
        spec = self.spec_after_token()
        return None if spec is None else Guess(FEED_TOKEN, spec)

    def on_context_full(self) -> None:
        """The sequence reached the model's context; the engine stops it."""
        self.finish_reason = "length"
        self.flush()

    def flush(self) -> None:
        """Emit any text still held back (called once, when the request ends)."""

    def emit(self, text: str) -> None:
        """Queue a chunk of streamed answer text."""
        if text:
            self._events.append(("text", text))

    def emit_event(self, kind: str, payload: Any) -> None:
        """Queue a non-text event (e.g. "reasoning" with the finished reasoning)."""
        self._events.append((kind, payload))

    def drain_events(self) -> list[tuple[str, Any]]:
        """Events produced since the last call, oldest first."""
        out, self._events = self._events, []
        return out
