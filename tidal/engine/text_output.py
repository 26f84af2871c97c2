"""Generated text as a caller sees it: tokens decoded incrementally, cut at the
first stop string, streamed in chunks that never show part of a stop string."""

from __future__ import annotations

from collections.abc import Callable

from tokenizers import Tokenizer

from tidal.engine.detokenizer import TextStreamer


class TextOutput:
    """push(token) -> whether a stop string ended the text; `text` so far."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], emit: Callable[[str], None]) -> None:
        self.streamer = TextStreamer(tokenizer)
        self.stop, self.emit = stop, emit
        self.text = ""
        self.stopped = False  # a stop string was found: the text ends before it
        self._held = ""  # decoded text held back while it could begin a stop string

    def push(self, token: int) -> bool:
        self._add(self.streamer.push(token))
        return self.stopped

    def finish(self) -> None:
        """Release what is held back (once, at the end)."""
        if not self.stopped:
            self._add(self.streamer.finish(), final=True)

    def _add(self, chunk: str, final: bool = False) -> None:
        pending = self._held + chunk
        hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._release(pending[: min(hits)])
            self._held, self.stopped = "", True
            return
        keep = 0 if final or not self.stop else max(len(s) for s in self.stop) - 1
        split = max(0, len(pending) - keep)
        self._release(pending[:split])
        self._held = pending[split:]

    def _release(self, text: str) -> None:
        self.text += text
        self.emit(text)
