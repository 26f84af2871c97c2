"""Plain text generation as a skill: sample tokens until an end token, a stop
string or max_tokens. Any model's LLM.generate runs on it."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer

from tidal.core import InputItem, OutputSpec, StepResult
from tidal.engine.sampling import SamplingParams
from tidal.engine.skill import Skill
from tidal.engine.text_output import TextOutput


class GenerateSkill(Skill):
    name = "generate"

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams, seed: int, eos_ids: tuple[int, ...], ignore_eos: bool = False) -> None:
        super().__init__()
        self.params, self.seed = params, seed
        self.eos_ids = () if ignore_eos else tuple(eos_ids)
        self.tokens: list[int] = []
        self.out = TextOutput(tokenizer, params.stop, self.emit) if tokenizer is not None else None

    def next_output(self) -> OutputSpec:
        p = self.params
        return OutputSpec(p.temperature, p.top_p, p.top_k, self.seed, len(self.tokens))

    def last_output_next(self) -> bool:
        return len(self.tokens) + 1 >= self.params.max_tokens

    def spec_after_token(self) -> OutputSpec | None:
        if self.last_output_next():
            return None
        p = self.params
        return OutputSpec(p.temperature, p.top_p, p.top_k, self.seed, len(self.tokens) + 1)

    def on_output(self, out: StepResult) -> list[InputItem] | None:
        token = out.token
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return None
        self.tokens.append(token)
        self.completion_tokens += 1
        if self.out is not None and self.out.push(token):
            self.finish_reason = "stop"
            return None
        if len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
            return None
        return [token]

    def flush(self) -> None:
        if self.out is not None:
            self.out.finish()
            if self.out.stopped:
                self.finish_reason = "stop"

    def result(self) -> dict[str, Any]:
        return {"text": self.out.text if self.out is not None else "", "token_ids": list(self.tokens), "finish_reason": self.finish_reason}
