"""Bad input raises a ValueError that says what was wrong, and nothing else breaks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import (
    assert_engine_idle,
    assert_matches_golden,
    golden_cases,
    golden_image,
    run_case,
)
from PIL import Image

from tidal.errors import ImageError, InvalidRequestError, PromptTooLongError

CHECK_CASE = next(c for c in golden_cases("query") if c["image"] == "wide" and not c["reasoning"])
DETECT_CASE = next(c for c in golden_cases("detect") if c["image"] == "tall")


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.open(golden_image("wide")).save(buf, format="PNG")
    return buf.getvalue()


BAD_CALLS = {
    "bytes that are not an image": (lambda md, img: md.caption(b"this is not an image"), ImageError, "could not be decoded"),
    "truncated image": (lambda md, img: md.caption(_png_bytes()[:4000]), ImageError, "could not be decoded"),
    "empty bytes": (lambda md, img: md.point(b"", "dog"), ImageError, "empty"),
    "zero-size PIL image": (lambda md, img: md.caption(Image.new("RGB", (0, 0))), ImageError, "empty"),
    "zero-size array": (lambda md, img: md.caption(np.zeros((0, 8, 3), np.uint8)), ImageError, "empty"),
    "float array": (lambda md, img: md.caption(np.zeros((8, 8, 3), np.float32)), ImageError, "uint8"),
    "missing file": (lambda md, img: md.caption("/nonexistent/cat.png"), ImageError, "no image file"),
    "unsupported type": (lambda md, img: md.caption(12345), ImageError, "unsupported image type"),
    "empty question": (lambda md, img: md.query(img, ""), InvalidRequestError, "question must not be empty"),
    "blank question": (lambda md, img: md.query(img, "   \n"), InvalidRequestError, "question must not be empty"),
    "no question": (lambda md, img: md.query(img), InvalidRequestError, "question must be a string"),
    "empty object (detect)": (lambda md, img: md.detect(img, ""), InvalidRequestError, "object must not be empty"),
    "empty object (point)": (lambda md, img: md.point(img, " "), InvalidRequestError, "object must not be empty"),
    "unknown caption length": (lambda md, img: md.caption(img, "medium"), InvalidRequestError, "unknown caption length 'medium'"),
    "max_tokens 0": (lambda md, img: md.query(img, "what", settings={"max_tokens": 0}), InvalidRequestError, "max_tokens must be"),
    "negative temperature": (lambda md, img: md.caption(img, settings={"temperature": -1}), InvalidRequestError, "temperature must be"),
    "top_p 0": (lambda md, img: md.caption(img, settings={"top_p": 0}), InvalidRequestError, r"top_p must be a number in \(0, 1\]"),
    "top_p above 1": (lambda md, img: md.query(img, "what", settings={"top_p": 1.01}), InvalidRequestError, "top_p"),
    "max_objects 0": (lambda md, img: md.detect(img, "dog", settings={"max_objects": 0}), InvalidRequestError, "max_objects must be"),
    "unknown setting": (lambda md, img: md.query(img, "what", settings={"temprature": 0}), InvalidRequestError, "unknown settings"),
    "text setting on detect": (lambda md, img: md.point(img, "dog", settings={"max_tokens": 5}), InvalidRequestError, "accepted here: max_objects"),
    "spatial ref of 1 number": (lambda md, img: md.query(img, "what", spatial_refs=[[0.5]]), InvalidRequestError, "2 numbers"),
    "spatial ref of 3 numbers": (lambda md, img: md.query(img, "what", spatial_refs=[[0.1, 0.2, 0.3]]), InvalidRequestError, "2 numbers"),
    "spatial ref out of range": (lambda md, img: md.query(img, "what", spatial_refs=[[1.5, 0.2]]), InvalidRequestError, r"in \[0, 1\]"),
    "spatial ref NaN": (lambda md, img: md.query(img, "what", spatial_refs=[[float("nan"), 0.2]]), InvalidRequestError, r"in \[0, 1\]"),
    "spatial box min > max": (lambda md, img: md.query(img, "what", spatial_refs=[[0.6, 0.2, 0.4, 0.8]]), InvalidRequestError, "min > max"),
    "spatial refs not a list": (lambda md, img: md.query(img, "what", spatial_refs="0.5,0.5"), InvalidRequestError, "spatial_refs must be"),
    "spatial refs without image": (lambda md, img: md.query(None, "what", spatial_refs=[[0.5, 0.5]]), InvalidRequestError, "need an image"),
    "prompt too long": (lambda md, img: md.query(img, "what " * 5000), PromptTooLongError, "context holds 4096"),
    "prompt too long, text only": (lambda md, img: md.query(None, "car " * 4095), PromptTooLongError, "context holds 4096"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_is_rejected_and_the_model_still_works(golden_md, golden_encoded, name):
    call, error, message = BAD_CALLS[name]
    with pytest.raises(error, match=message) as info:
        call(golden_md, golden_encoded["wide"])
    assert isinstance(info.value, ValueError)
    assert_matches_golden(run_case(golden_md, CHECK_CASE, golden_encoded["wide"]), CHECK_CASE)


def test_engine_holds_nothing_after_errors(golden_md, golden_encoded):
    for name in ("truncated image", "prompt too long", "max_objects 0"):
        with pytest.raises(ValueError):
            BAD_CALLS[name][0](golden_md, golden_encoded["wide"])
    assert_matches_golden(run_case(golden_md, DETECT_CASE, golden_encoded["tall"]), DETECT_CASE)
    assert_engine_idle(golden_md.engine)
