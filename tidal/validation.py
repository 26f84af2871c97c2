"""Checks for what callers pass: text (bounded, valid Unicode) and numbers
(range-checked, numpy scalars accepted). Each failure is an InvalidRequestError
whose message says what is accepted and never echoes a large value."""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

from tidal.errors import InvalidRequestError

# Longest question, object or chat text, in characters. Checked before
# tokenizing: the context (4096 positions) never holds more than a few
# characters per position, and tokenizing megabytes would stall the server.
MAX_TEXT_CHARS = 65_536
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256

_SURROGATE = re.compile("[\ud800-\udfff]")


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (error messages stay small)."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def check_text(value: Any, what: str, max_chars: int = MAX_TEXT_CHARS, allow_empty: bool = False) -> str:
    """A str of at most max_chars characters, valid Unicode (no lone surrogates),
    and unless allow_empty, not blank."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidRequestError(f"{what} is {len(value)} characters long; the limit is {max_chars}")
    bad = _SURROGATE.search(value)
    if bad:
        raise InvalidRequestError(f"{what} holds a lone UTF-16 surrogate (U+{ord(bad.group()):04X}) at character {bad.start()}; send valid Unicode text")
    if not allow_empty and not value.strip():
        raise InvalidRequestError(f"{what} must not be empty")
    return value


def as_int(value: Any, what: str, lo: int, hi: int, meaning: str = "") -> int:
    """An integer (Python or numpy, not bool) in [lo, hi], as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or type(value).__name__ == "bool_":
        raise InvalidRequestError(f"{what} must be an integer in [{lo}, {hi}]{meaning}, got {short_repr(value)}")
    v = int(value)
    if not lo <= v <= hi:
        raise InvalidRequestError(f"{what} must be an integer in [{lo}, {hi}]{meaning}, got {v if abs(v) < 10**30 else short_repr(v)}")
    return v


def as_float(value: Any, what: str, lo: float, hi: float, lo_open: bool = False, meaning: str = "") -> float:
    """A finite real number (Python or numpy, not bool) in [lo, hi] (or (lo, hi]), as a Python float."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or type(value).__name__ == "bool_":
        raise InvalidRequestError(f"{what} must be a number in {interval}{meaning}, got {short_repr(value)}")
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise InvalidRequestError(f"{what} must be a number in {interval}{meaning}, got {short_repr(value)}")
    return v
