"""Images sent again as the same encoded bytes (an HTTP client repeating its
upload, a file path asked about twice): known by their pixels' key from the
bytes' hash, and not decoded at all while the prefix cache holds the image."""

from __future__ import annotations

import io
import threading

import pytest
from conftest import (
    GOLDEN,
    assert_matches_golden,
    golden_cases,
    golden_image,
    prepare_case,
)
from PIL import Image

import tidal
import tidal.api
from tidal.core import Deferred, ImageRef
from tidal.engine.engine import EngineConfig
from tidal.images import DecodedKeys, bytes_key

CASE = next(c for c in golden_cases("query") if c["image"] == "wide" and not c["reasoning"] and not c.get("spatial_refs"))


@pytest.fixture()
def counted(monkeypatch):
    """A fresh golden model (its own prefix cache) and a list that grows by one
    each time the API decodes an image's pixels."""
    decodes = []
    real = tidal.api.decoded_pixels
    monkeypatch.setattr(tidal.api, "decoded_pixels", lambda *a, **k: decodes.append(1) or real(*a, **k))
    md = tidal.Moondream.from_pretrained(GOLDEN, device="cpu", dtype="float32", engine_config=EngineConfig(trace_logits=True))
    yield md, decodes
    md.close()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.open(golden_image("wide")).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _run(md, image):
    handle = md._submit(*prepare_case(md, CASE, image))
    result = handle.wait()
    return result, [t.logits for t in handle.request.trace]


def test_the_same_bytes_again_are_not_decoded_while_the_image_is_cached(counted):
    md, decodes = counted
    data = _png()
    first, first_logits = _run(md, data)
    assert len(decodes) == 1
    ref = md._image_item(data)
    assert isinstance(ref, ImageRef) and isinstance(ref.payload, Deferred) and len(decodes) == 1
    again, again_logits = _run(md, data)
    assert len(decodes) == 1  # known by its bytes, served from the cache
    assert_matches_golden(first, CASE)
    assert_matches_golden(again, CASE)
    assert len(again_logits) == len(first_logits)
    for a, b in zip(first_logits, again_logits):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-5
    other = io.BytesIO()  # the same pixels in other bytes: decoded (then the pixels' key finds the cache)
    Image.open(io.BytesIO(data)).save(other, format="BMP")
    assert_matches_golden(_run(md, other.getvalue())[0], CASE)
    assert len(decodes) == 2


def test_a_file_path_asked_about_again_is_not_decoded(counted):
    md, decodes = counted
    path = golden_image("wide")
    _run(md, path)
    assert_matches_golden(_run(md, str(path))[0], CASE)
    assert len(decodes) == 1


def test_known_bytes_are_decoded_when_the_image_is_not_cached(counted):
    """A hint that went stale (the cache dropped the image between the API's
    look and the request's step): the engine decodes the deferred pixels
    itself; and with the image not cached at all the API decodes as usual."""
    md, decodes = counted
    data = _png()
    _run(md, data)
    prepared = prepare_case(md, CASE, data)
    assert isinstance(prepared[1][1].payload, Deferred)
    assert md.clear_cache() > 0
    handle = md._submit(*prepared)
    assert_matches_golden(handle.wait(), CASE)
    assert len(decodes) == 2  # the engine made the deferred payload
    md.clear_cache()
    md._image_item(data)  # known bytes, image not cached: decoded now, in the caller's thread
    assert len(decodes) == 3


def test_deferred_is_made_once_across_threads():
    calls = []
    gate = threading.Barrier(8)
    d = Deferred(lambda: calls.append(1) or object())
    got = []

    def worker():
        gate.wait()
        got.append(d.get())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(g is got[0] for g in got)


def test_decoded_keys_forget_the_least_recently_used():
    keys = DecodedKeys(capacity=2)
    keys.put("a", "A")
    keys.put("b", "B")
    assert keys.get("a") == "A"  # a is now the most recent
    keys.put("c", "C")
    assert keys.get("b") is None and keys.get("a") == "A" and keys.get("c") == "C"


def test_bytes_keys_follow_content_and_length():
    data = _png()
    assert bytes_key(data) == bytes_key(bytearray(data)) == bytes_key(bytes(data))
    assert bytes_key(data) != bytes_key(data + b"\0") and bytes_key(data) != bytes_key(data[:-1])
    big = bytes(range(256)) * 8192  # 2 MiB: hashed in parallel chunks
    flipped = bytearray(big)
    flipped[-1] ^= 1
    assert bytes_key(big) != bytes_key(bytes(flipped))


def test_base64_uploads_are_not_even_base64_decoded_again(counted, monkeypatch):
    """The server hands data URLs' base64 text to the API undecoded: the second
    time the same text comes it is neither base64-decoded nor decoded while the
    image is cached; bad text is still refused with the server's message."""
    import base64

    from tidal.errors import ImageError
    from tidal.images import Base64Image

    md, decodes = counted
    unpacked = []
    real = Base64Image.decode
    monkeypatch.setattr(Base64Image, "decode", lambda self: unpacked.append(1) or real(self))
    text = base64.b64encode(_png()).decode()
    assert_matches_golden(_run(md, Base64Image(text))[0], CASE)
    assert len(decodes) == 1 and len(unpacked) == 1
    assert_matches_golden(_run(md, Base64Image(text))[0], CASE)
    assert len(decodes) == 1 and len(unpacked) == 1
    with pytest.raises(ImageError, match="image_url is not valid base64"):
        md._image_item(Base64Image(text[:100] + "!" + text[101:]))


def test_a_file_rewritten_while_it_is_read_keys_the_pixels_decoded(tmp_path):
    """What is hashed is what is decoded: a file rewritten between the hash
    and the decode cannot tie its old bytes' key to the new pixels."""
    import numpy as np

    from tidal.images import decoded_pixels, pixels_key, pixels_or_deferred

    first, second = (np.full((8, 8, 3), v, dtype=np.uint8) for v in (10, 200))
    path = tmp_path / "latest.png"
    Image.fromarray(first).save(path)

    def decode(src):
        Image.fromarray(second).save(path)  # a camera writes the next frame meanwhile
        with decoded_pixels(src) as pixels:
            return pixels

    known = DecodedKeys()
    pixels, key = pixels_or_deferred(path, known, None, decode, pixels_key)
    assert np.array_equal(pixels, first) and key == pixels_key(first)
    again, key2 = pixels_or_deferred(path, known, None, decode, pixels_key)  # now the second frame's bytes
    assert np.array_equal(again, second) and key2 == pixels_key(second)


def test_an_image_seen_under_another_pixel_limit_is_checked_again():
    from tidal.errors import ImageError
    from tidal.images import decoded_pixels, pixels_key, pixels_or_deferred

    data = _png()  # 1200 x 500

    def under(limit):
        def decode(src):
            with decoded_pixels(src, limit) as pixels:
                return pixels

        return decode

    known = DecodedKeys()
    pixels_or_deferred(data, known, None, under(None), pixels_key)
    assert isinstance(pixels_or_deferred(data, known, None, under(None), pixels_key)[0], Deferred)
    with pytest.raises(ImageError, match="the limit is 1000"):
        pixels_or_deferred(data, known, 1000, under(1000), pixels_key)
    assert not isinstance(pixels_or_deferred(data, None, None, under(None), pixels_key)[0], Deferred)  # no memory: decoded


def test_a_corrupt_file_is_named_as_a_file(tmp_path):
    from tidal.errors import ImageError

    path = tmp_path / "broken.png"
    path.write_bytes(_png()[:200])
    md = tidal.Moondream.from_pretrained(GOLDEN, device="cpu", dtype="float32")
    try:
        with pytest.raises(ImageError, match="the image file"):
            md._image_item(path)
    finally:
        md.close()
