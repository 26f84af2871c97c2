"""Moondream 3 skills as state machines: query (with optional reasoning), caption,
detect and point. Each follows the authors' reference step for step; see
tests/data/README.md (the golden fixture) for the semantics.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from tidal.core import (
    FEED_COORD,
    FEED_SAMPLED,
    FEED_SIZE,
    FEED_TOKEN,
    FINISHES,
    CoordInput,
    Guess,
    InputItem,
    OutputSpec,
    SizeInput,
    StepResult,
)
from tidal.engine.sampling import SamplingParams
from tidal.engine.skill import Skill
from tidal.engine.text_output import TextOutput

from .config import TokenizerConfig
from .region import coord_from_bin, size_from_bins


class TextAnswer:
    """Generates answer text until eos or max_tokens, streaming chunks out.

    The first token (from the prompt's prefill) is unconstrained; later ones
    have the answer token banned, as in the reference.
    """

    def __init__(self, skill: Skill, tokenizer: Tokenizer, params: SamplingParams, ids: TokenizerConfig, seed: int) -> None:
        self.skill, self.params, self.ids, self.seed = skill, params, ids, seed
        self.out = TextOutput(tokenizer, params.stop, skill.emit)
        self.tokens: list[int] = []

    @property
    def text(self) -> str:
        return self.out.text

    def spec(self, step: int) -> OutputSpec:
        p = self.params
        banned = (self.ids.answer_id,) if self.tokens else ()
        return OutputSpec(p.temperature, p.top_p, p.top_k, self.seed, step, banned)

    def spec_after_token(self, step: int) -> OutputSpec | None:
        """The spec of output `step` if the output before it is a token that
        continues the answer (then the answer id is banned); None if that
        output is the last."""
        if self.last():
            return None
        p = self.params
        return OutputSpec(p.temperature, p.top_p, p.top_k, self.seed, step, (self.ids.answer_id,))

    def last(self) -> bool:
        """Whether the next answer token is certainly the last (max_tokens)."""
        return len(self.tokens) + 1 >= self.params.max_tokens

    def on_token(self, token: int) -> list[InputItem] | None:
        if token == self.ids.eos_id:
            self.skill.finish_reason = "stop"
            return None
        self.tokens.append(token)
        self.skill.completion_tokens += 1
        if self.out.push(token):
            self.skill.finish_reason = "stop"
            return None
        if len(self.tokens) >= self.params.max_tokens:
            self.skill.finish_reason = "length"
            return None
        return [token]

    def flush(self) -> None:
        self.out.finish()
        if self.out.stopped:  # a stop string completed by the held-back tail
            self.skill.finish_reason = "stop"


class QuerySkill(Skill):
    """Answer a question; with reasoning, first think (with grounding), then answer."""

    name = "query"

    def __init__(self, tokenizer: Tokenizer, ids: TokenizerConfig, params: SamplingParams, seed: int, reasoning: bool) -> None:
        super().__init__()
        self.tokenizer, self.ids, self.params, self.seed = tokenizer, ids, params, seed
        self.answer = TextAnswer(self, tokenizer, params, ids, seed)
        self.reasoning = reasoning
        self.thinking = reasoning  # still in the reasoning phase
        self._chunks: list[list[int]] = [[]]  # reasoning tokens, split at grounding markers
        self._coords: list[list[float]] = [[]]
        self._reason_steps = 0
        self._steps = 0

    def next_output(self) -> OutputSpec:
        if self.thinking:
            p = self.params
            banned = (self.ids.eos_id, self.ids.size_id) if self._reason_steps else ()
            return OutputSpec(p.temperature, p.top_p, p.top_k, self.seed, self._steps, banned)
        return self.answer.spec(self._steps)

    def last_output_next(self) -> bool:
        return not self.thinking and self.answer.last()

    def spec_after_token(self) -> OutputSpec | None:
        if not self.thinking:
            return self.answer.spec_after_token(self._steps + 1)
        if self._reason_steps + 1 >= self.params.max_tokens:
            return None  # the next output ends the reasoning
        p = self.params  # a plain reasoning token (not the answer id, not a coordinate)
        return OutputSpec(p.temperature, p.top_p, p.top_k, self.seed, self._steps + 1, (self.ids.eos_id, self.ids.size_id))

    def guess_next(self) -> Guess | None:
        """While thinking, a coordinate token feeds its coordinate and any
        other token itself, and either asks next for the same spec: the
        model tells which off the sampled token (FEED_SAMPLED)."""
        guess = super().guess_next()
        if self.thinking and guess is not None and guess.feed == FEED_TOKEN:
            return Guess(FEED_SAMPLED, guess.spec)
        return guess

    def on_output(self, out: StepResult) -> list[InputItem] | None:
        self._steps += 1
        if not self.thinking:
            return self.answer.on_token(out.token)
        token = out.token
        if token == self.ids.answer_id or self._reason_steps >= self.params.max_tokens:
            return self._end_reasoning([])
        self._reason_steps += 1
        self.completion_tokens += 1
        if token in (self.ids.start_ground_points_id, self.ids.end_ground_id):
            self._chunks.append([])
            self._coords.append([])
        self._chunks[-1].append(token)
        item: InputItem = token
        if token == self.ids.coord_id:
            value = coord_from_bin(out.coord_bin)
            self._coords[-1].append(value)
            item = CoordInput(value)
        if self._reason_steps >= self.params.max_tokens:
            # The reference feeds this token, then discards the next output.
            return self._end_reasoning([item])
        return [item]

    def _end_reasoning(self, feed: list[InputItem]) -> list[InputItem]:
        """Reasoning is over: feed `feed`, then the query template's suffix,
        after which the answer begins (the sampled answer id is not fed)."""
        self.thinking = False
        self.emit_event("reasoning", self.reasoning_result())
        return feed + list(self.ids.templates["query"]["suffix"])

    def flush(self) -> None:
        self.answer.flush()

    def reasoning_result(self) -> dict:
        texts = [self.tokenizer.decode(c) for c in self._chunks]
        grounding, start = [], 0
        for text, coords in zip(texts, self._coords):
            if len(coords) > 1:
                points = [(coords[i], coords[i + 1]) for i in range(0, len(coords) - 1, 2)]
                grounding.append({"start_idx": start, "end_idx": start + len(text), "points": points})
            start += len(text)
        return {"text": "".join(texts), "grounding": grounding}

    def result(self) -> dict:
        out: dict = {}
        if self.reasoning:
            out["reasoning"] = self.reasoning_result()
        out["answer"] = self.answer.text
        return out


class CaptionSkill(Skill):
    name = "caption"

    def __init__(self, tokenizer: Tokenizer, ids: TokenizerConfig, params: SamplingParams, seed: int) -> None:
        super().__init__()
        self.answer = TextAnswer(self, tokenizer, params, ids, seed)
        self._steps = 0

    def next_output(self) -> OutputSpec:
        return self.answer.spec(self._steps)

    def last_output_next(self) -> bool:
        return self.answer.last()

    def spec_after_token(self) -> OutputSpec | None:
        return self.answer.spec_after_token(self._steps + 1)

    def on_output(self, out: StepResult) -> list[InputItem] | None:
        self._steps += 1
        return self.answer.on_token(out.token)

    def flush(self) -> None:
        self.answer.flush()

    def result(self) -> dict:
        return {"caption": self.answer.text}


class LocateSkill(Skill):
    """Detect (boxes) or point: per object, x, y (and for boxes a size), then
    continue while the coordinate token beats eos. Always greedy."""

    def __init__(self, ids: TokenizerConfig, max_objects: int, with_size: bool) -> None:
        super().__init__()
        self.ids, self.max_objects, self.with_size = ids, max_objects, with_size
        self.name = "detect" if with_size else "point"
        self.objects: list[dict[str, float]] = []
        self._state = "first"  # first -> y -> (size ->) decide -> y ...
        self._x = self._y = 0.0

    def next_output(self) -> OutputSpec:
        return OutputSpec(temperature=0.0)

    def _done(self) -> None:
        self.finish_reason = "stop"

    def guess_next(self) -> Guess | None:
        """The coordinate of the next output is fed back (x, then y), then for
        boxes its size, unless the model says eos (then the guess is dropped);
        the output that completes the last object wanted is the last."""
        greedy = OutputSpec(temperature=0.0)
        last = len(self.objects) + 1 >= self.max_objects  # the object being read is the last wanted
        if self._state in ("first", "decide") or self._state == "y" and self.with_size:
            return Guess(FEED_COORD, greedy)
        if self._state == "y":  # a point's y ends its object
            return FINISHES if last else Guess(FEED_COORD, greedy)
        return FINISHES if last else Guess(FEED_SIZE, greedy)

    def on_output(self, out: StepResult) -> list[InputItem] | None:
        self.completion_tokens += 1  # each output is one generated position
        state = self._state
        if state == "first" and out.token == self.ids.eos_id or state == "decide" and not out.coord_over_eos:
            self._done()
            return None
        if state in ("first", "decide"):
            self._x = coord_from_bin(out.coord_bin)
            self._state = "y"
            return [CoordInput(self._x)]
        if state == "y":
            self._y = coord_from_bin(out.coord_bin)
            if self.with_size:
                self._state = "size"
                return [CoordInput(self._y)]
            self.objects.append({"x": self._x, "y": self._y})
            return self._next_object([CoordInput(self._y)])
        w, h = size_from_bins(torch.tensor(out.size_bins)).tolist()
        x, y = self._x, self._y
        self.objects.append({"x_min": x - w / 2, "y_min": y - h / 2, "x_max": x + w / 2, "y_max": y + h / 2})
        return self._next_object([SizeInput(w, h)])

    def _next_object(self, feed: list[InputItem]) -> list[InputItem] | None:
        if len(self.objects) >= self.max_objects:
            self._done()
            return None
        self._state = "decide"
        return feed

    def result(self) -> dict:
        return {"objects": self.objects} if self.with_size else {"points": self.objects}
