"""Turning what users pass as an image into a checked RGB PIL image."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from tidal.errors import ImageError

ImageLike = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]

ACCEPTED = "a PIL image, a file path, raw image bytes (PNG, JPEG, ...), or a uint8 numpy array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"


def load_image(image: Any, max_pixels: int | None = None) -> Image.Image:
    """Decode and fully load `image` as RGB, or raise ImageError saying why not.

    max_pixels: refuse larger images (checked from the header, before decoding).
    """
    if isinstance(image, Image.Image):
        pil = image
        try:
            pil.load()
        except Exception as exc:
            raise ImageError(f"the PIL image could not be loaded ({exc})") from exc
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise ImageError(f"no image file at {str(path)!r}")
        pil = _decode(path.read_bytes(), f"the file {str(path)!r}", max_pixels)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        pil = _decode(bytes(image), "the image bytes", max_pixels)
    elif isinstance(image, np.ndarray):
        pil = _from_array(image)
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}; pass {ACCEPTED}")
    if pil.width < 1 or pil.height < 1:
        raise ImageError(f"the image is empty ({pil.width}x{pil.height} pixels)")
    _check_pixels(pil, max_pixels)
    return pil if pil.mode == "RGB" else pil.convert("RGB")


def _check_pixels(pil: Image.Image, max_pixels: int | None) -> None:
    if max_pixels is not None and pil.width * pil.height > max_pixels:
        raise ImageError(f"the image is {pil.width}x{pil.height} = {pil.width * pil.height} pixels; the limit is {max_pixels}")


def _decode(data: bytes, what: str, max_pixels: int | None = None) -> Image.Image:
    if not data:
        raise ImageError(f"{what} are empty" if what.endswith("bytes") else f"{what} is empty")
    try:
        pil = Image.open(io.BytesIO(data))
        _check_pixels(pil, max_pixels)  # from the header, before the pixels are decoded
        pil.load()  # decode now: truncated or corrupt data fails here, not later
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what}: the image has too many pixels ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{what} could not be decoded as an image ({exc}); pass {ACCEPTED}") from exc
    return pil


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageError(f"numpy images must be uint8, got {arr.dtype}; pass {ACCEPTED}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(f"numpy image has shape {arr.shape}; pass {ACCEPTED}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"the image is empty (shape {arr.shape})")
    return Image.fromarray(np.ascontiguousarray(arr))


def image_key(rgb: Image.Image) -> str:
    """Content hash of the decoded pixels: equal pixels give equal keys."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{rgb.width}x{rgb.height}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()
