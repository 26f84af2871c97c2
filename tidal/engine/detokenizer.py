"""Incremental detokenization with the reference streamer's chunking.

Chunks are cut after a newline (and the token cache restarts), after a CJK
character, or otherwise at the last space; `finish` flushes the rest. Joined,
the chunks are the whole decoded text.
"""

from __future__ import annotations

from tokenizers import Tokenizer

# Unicode blocks of CJK ideographs (the same ranges Hugging Face's streamer uses).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def is_cjk(char: str) -> bool:
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


class TextStreamer:
    """Feed token ids one by one; get back the text that is safe to show."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: list[int] = []
        self._printed = 0  # characters of decode(_cache) already returned

    def push(self, token: int) -> str:
        self._cache.append(token)
        text = self.tokenizer.decode(self._cache)
        if text.endswith("\n"):
            out = text[self._printed :]
            self._cache, self._printed = [], 0
            return out
        if text and is_cjk(text[-1]):
            out = text[self._printed :]
        else:
            space = text.rfind(" ", self._printed)
            out = text[self._printed : space + 1] if space >= self._printed else ""
        self._printed += len(out)
        return out

    def finish(self) -> str:
        if not self._cache:
            return ""
        out = self.tokenizer.decode(self._cache)[self._printed :]
        self._cache, self._printed = [], 0
        return out
