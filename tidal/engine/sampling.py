"""Sampling parameters, as callers give them and the engine checks them.
The sampler itself is in tidal.runner.sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

from tidal.errors import InvalidRequestError
from tidal.validation import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    as_float,
    as_int,
    check_text,
)

MAX_TEMPERATURE = 100.0
_SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 disables top-k."""

    temperature: float = 0.5
    top_p: float = 0.9
    top_k: int = 0
    max_tokens: int = 768
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self, vocab_size: int, max_context: int) -> "SamplingParams":
        """Check every field's type and range, converting numpy scalars to Python
        numbers in place; raise InvalidRequestError saying what is accepted."""
        self.temperature = as_float(self.temperature, "temperature", 0.0, MAX_TEMPERATURE, meaning=" (0 = greedy)")
        self.top_p = as_float(self.top_p, "top_p", 0.0, 1.0, lo_open=True)
        self.top_k = as_int(self.top_k, "top_k", 0, vocab_size, meaning=" (0 = off)")
        self.max_tokens = as_int(self.max_tokens, "max_tokens", 1, max_context, meaning=" (the model's context)")
        stop = self.stop
        if not isinstance(stop, (list, tuple)):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} are accepted")
        for i, s in enumerate(stop):
            if check_text(s, f"stop[{i}]", MAX_STOP_CHARS, allow_empty=True) == "":
                raise InvalidRequestError(f"stop[{i}] is empty; stop strings must be non-empty")  # "\n" is fine
        self.stop = list(stop)
        if self.seed is not None:
            self.seed = as_int(self.seed, "seed", *_SEED_RANGE, meaning=" (64 bits)")
        return self
