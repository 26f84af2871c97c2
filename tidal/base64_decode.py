"""Base64 decoding that leaves the GIL to other threads.

An HTTP upload's image arrives as base64 text. `binascii` decodes it holding
the GIL throughout: on the H100 host a request thread's base64 was half of
all the GIL time the server's request threads took (py-spy, 2026-12-07), and
the engine's thread waits for the GIL between its GPU steps. numpy's
vectorized loops release the GIL: the same decode as a table lookup and bit
operations lets other threads run beside it (about 1.8x the CPU time of
binascii, spent outside the GIL).

Accepts exactly what `base64.b64decode(text, validate=True)` accepts and
gives the same bytes: text in the canonical form (the standard alphabet, a
length a multiple of four, one or two '=' only at the end) is decoded here,
anything else by binascii.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_INVALID = 255
_VALUES = np.full(256, _INVALID, np.uint8)  # character -> its 6 bits; anything else (and '=') -> 255
_VALUES[np.frombuffer(_ALPHABET, np.uint8)] = np.arange(64, dtype=np.uint8)
_PAD = ord("=")

# Below this many characters binascii is used: its GIL time is short, and
# numpy's per-call overhead would dominate.
NUMPY_MIN_CHARS = 1 << 16


def b64decode_strict(text: str | bytes) -> bytes:
    """base64.b64decode(text, validate=True), without holding the GIL for
    long inputs. Raises binascii.Error for anything it would refuse (and for
    text that is not ASCII)."""
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            raise binascii.Error("non-ASCII character in base64 text") from None
    if len(text) < NUMPY_MIN_CHARS:
        return base64.b64decode(text, validate=True)
    decoded = _decode_canonical(text)
    # Text outside the canonical form is rare (and binascii accepts some of it,
    # such as padding after a whole group): binascii decides.
    return base64.b64decode(text, validate=True) if decoded is None else decoded


def _decode_canonical(text: bytes) -> bytes | None:
    """The bytes of base64 in its canonical form (the alphabet only, a length
    a multiple of 4, '=' only as the last one or two characters), or None."""
    chars = np.frombuffer(text, np.uint8)
    n = chars.size
    if n % 4 or n == 0:
        return None if n else b""
    pad = 2 if chars[-2] == _PAD and chars[-1] == _PAD else 1 if chars[-1] == _PAD else 0
    six = _VALUES.take(chars)  # a new array: the padding can be zeroed in place
    if pad:
        six[n - pad :] = 0
    if six.max() == _INVALID:  # a character outside the alphabet, or '=' before the end
        return None
    quads = six.reshape(-1, 4)
    out = np.empty((quads.shape[0], 3), np.uint8)
    # 4 x 6 bits -> 3 bytes: aaaaaabb bbbbcccc ccdddddd
    np.left_shift(quads[:, 0], 2, out=out[:, 0])
    out[:, 0] |= quads[:, 1] >> 4
    np.left_shift(quads[:, 1] & 15, 4, out=out[:, 1])
    out[:, 1] |= quads[:, 2] >> 2
    np.left_shift(quads[:, 2] & 3, 6, out=out[:, 2])
    out[:, 2] |= quads[:, 3]
    return out.reshape(-1)[: out.size - pad].tobytes()
