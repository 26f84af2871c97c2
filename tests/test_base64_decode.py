"""tidal.base64_decode against base64.b64decode(validate=True): the same
bytes for what it accepts, a refusal for what it refuses, on valid text,
text mutated at random (characters, padding, length) and text long enough
for the numpy path."""

from __future__ import annotations

import base64
import binascii
import os
import random

import pytest

import tidal.base64_decode as b64


def _reference(text: bytes) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        return None


def _ours(text: bytes) -> bytes | None:
    try:
        return b64.b64decode_strict(text)
    except binascii.Error:
        return None


def _mutated(rng: random.Random, text: bytes) -> bytes:
    t = bytearray(text)
    kind = rng.randrange(6)
    if kind == 1 and t:
        t[rng.randrange(len(t))] = rng.randrange(32, 127)
    elif kind == 2 and t:
        del t[rng.randrange(len(t))]
    elif kind == 3:
        t += b"=" * rng.randrange(1, 4)
    elif kind == 4:
        t.insert(rng.randrange(len(t) + 1), ord(rng.choice("=A/+ \n")))
    elif kind == 5 and t:
        t[rng.randrange(len(t))] = ord("=")
    return bytes(t)


@pytest.mark.parametrize("numpy_min", [0, b64.NUMPY_MIN_CHARS])
def test_short_text_decodes_as_binascii_does(monkeypatch, numpy_min):
    """Every path (numpy from the first character, or binascii below the
    threshold) on 20,000 short texts, valid and mutated."""
    monkeypatch.setattr(b64, "NUMPY_MIN_CHARS", numpy_min)
    rng = random.Random(numpy_min)
    accepted = 0
    for _ in range(20_000):
        text = _mutated(rng, base64.b64encode(os.urandom(rng.randrange(0, 13))))
        want = _reference(text)
        assert _ours(text) == want, text
        accepted += want is not None
    assert 0.2 < accepted / 20_000 < 0.9  # both sides exercised


def test_long_text_decodes_as_binascii_does():
    """Past NUMPY_MIN_CHARS, valid and with one mutation each; str and bytes."""
    rng = random.Random(1)
    for n in (3 * b64.NUMPY_MIN_CHARS // 4, 3 * b64.NUMPY_MIN_CHARS // 4 + 1, 200_002, 300_000):
        raw = os.urandom(n)
        text = base64.b64encode(raw)
        assert b64.b64decode_strict(text) == raw and b64.b64decode_strict(text.decode()) == raw
        for _ in range(20):
            bad = _mutated(rng, text)
            assert _ours(bad) == _reference(bad)


def test_non_ascii_text_is_refused():
    with pytest.raises(binascii.Error):
        b64.b64decode_strict("QUJD" * 20_000 + "é===")
