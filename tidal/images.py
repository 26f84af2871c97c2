"""Turning what users pass as an image into a checked RGB PIL image.

Decoding is where a small upload can cost a lot of memory (a 62 KB PNG can
decode to 8000x6000 pixels), so: only common photo and screenshot formats are
opened; the pixel count is checked from the header before any pixel is
decoded; and decodes in flight share a pixel budget, so many concurrent
uploads wait for each other instead of exhausting memory.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, ImageSequence

from tidal.base64_decode import b64decode_strict
from tidal.core import Deferred
from tidal.errors import ImageError

ImageLike = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, "Base64Image"]

ACCEPTED = "a PIL image, a file path, raw image bytes (PNG, JPEG, WebP, GIF, BMP or TIFF), or a uint8 numpy array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"

# Formats opened from bytes and files. Others (ICO, ICNS, PSD, ...) can hide an
# embedded image larger than their header says; a vision model needs none of them.
# Those this Pillow registers: Pillow 13 opens MPO files through its JPEG
# plugin and has no "MPO" entry, and naming a format Pillow lacks makes
# Image.open fail for every format listed after it.
Image.init()
FORMATS = tuple(f for f in ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF") if f in Image.OPEN)

# Moondream 3 looks at an image through at most 12 crops of 378 px (about
# 1.7 M pixels); anything above 4096 x 4096 is only downscaled, at a cost.
DEFAULT_MAX_PIXELS = 4096 * 4096

# Pixels being decoded (and cropped) at once, across all threads: about
# 7 bytes a pixel at the peak, so roughly 0.5 GB.
DECODE_BUDGET_PIXELS = 4 * DEFAULT_MAX_PIXELS

_ORIENTATION = 0x0112  # the EXIF tag


class PixelBudget:
    """A counting limit on pixels decoded at once; reserve() waits for room."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        n = min(pixels, self.capacity)  # a single huge image still goes through, alone
        with self._cond:
            while self.used + n > self.capacity:
                self._cond.wait()
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


DECODE_BUDGET = PixelBudget(DECODE_BUDGET_PIXELS)

@dataclass(frozen=True, eq=False)
class Base64Image:
    """An image as base64 text (an HTTP data URL's payload, whitespace
    removed), decoded only when its pixels are needed: an upload the API has
    decoded before is known by the text's hash. `field` names the request's
    part in errors."""

    text: str
    field: str = "image_url"

    def decode(self) -> bytes:
        """The encoded image's bytes; ImageError if the text is not base64.
        Long text is decoded without holding the GIL (tidal.base64_decode):
        the engine's thread needs it between its GPU steps."""
        try:
            return b64decode_strict(self.text)
        except (binascii.Error, ValueError):
            raise ImageError(f"{self.field} is not valid base64") from None


@contextmanager
def decoded_image(image: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Iterator[Image.Image]:
    """Decode `image` as RGB and hold its pixels in the decode budget for as
    long as the block runs (the caller crops it there). Raises ImageError
    saying why an image is refused.

    Files and bytes get their EXIF orientation applied (photos come out the
    way up a viewer shows them); PIL images and arrays are taken as given.
    """
    if isinstance(image, Image.Image):
        _check_size(image.width, image.height, max_pixels)
        try:
            image.load()
        except Exception:
            raise ImageError("the PIL image could not be loaded (truncated or corrupt data)") from None
        with DECODE_BUDGET.reserve(image.width * image.height):
            yield image if image.mode == "RGB" else image.convert("RGB")
        return
    if isinstance(image, np.ndarray):
        pil = _from_array(image)
        _check_size(pil.width, pil.height, max_pixels)
        with DECODE_BUDGET.reserve(pil.width * pil.height):
            yield pil if pil.mode == "RGB" else pil.convert("RGB")
        return
    if isinstance(image, Base64Image):
        image = image.decode()
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise ImageError(f"no image file at {str(path)!r}")
        data, what = path.read_bytes(), "the image file"
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data, what = bytes(image), "the image file" if isinstance(image, FileBytes) else "the image bytes"
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}; pass {ACCEPTED}")
    if not data:
        raise ImageError(f"{what} {'are' if what.endswith('bytes') else 'is'} empty")
    pil = open_header(data, what)
    _check_size(pil.width, pil.height, max_pixels)  # from the header: nothing decoded yet
    with DECODE_BUDGET.reserve(pil.width * pil.height):
        try:
            pil.load()
            if pil.getexif().get(_ORIENTATION, 1) != 1:
                pil = ImageOps.exif_transpose(pil)
            rgb = pil if pil.mode == "RGB" else pil.convert("RGB")
        except Exception:
            raise ImageError(f"{what} could not be decoded (truncated or corrupt data); pass {ACCEPTED}") from None
        yield rgb


@contextmanager
def decoded_pixels(image: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Iterator[np.ndarray]:
    """decoded_image's pixels as uint8 RGB [H, W, 3]. An array that already is
    that is copied once instead of going through a PIL image and back (two
    copies, ~4 ms for a 1280x720 image); the copy keeps the request's pixels
    safe from the caller changing its array later."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        height, width = image.shape[:2]
        _check_size(width, height, max_pixels)
        with DECODE_BUDGET.reserve(width * height):
            yield np.array(image, copy=True, order="C")
        return
    with decoded_image(image, max_pixels) as rgb:
        yield np.asarray(rgb)


MAX_VIDEO_FRAMES = 1024  # frames decoded from one animated image
MAX_VIDEO_PIXELS = 1 << 28  # all its frames together (768 MiB of RGB)


def animation_frames(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, float | None]:
    """An animated image (GIF, WebP or PNG) as video frames: (uint8 RGB
    [T, H, W, 3], frames per second from the frames' durations, or None where
    the file gives none). A still image is one frame."""
    pil = open_header(data, "the video")
    _check_size(pil.width, pil.height, max_pixels)
    count = getattr(pil, "n_frames", 1)
    if count > MAX_VIDEO_FRAMES:
        raise ImageError(f"the animation has {count} frames; the limit is {MAX_VIDEO_FRAMES}")
    if count * pil.width * pil.height > MAX_VIDEO_PIXELS:
        raise ImageError(f"the animation has {count} frames of {pil.width}x{pil.height}: over {MAX_VIDEO_PIXELS} pixels in all; downscale it or send fewer frames")
    frames, durations = [], []
    with DECODE_BUDGET.reserve(pil.width * pil.height * count):
        try:
            for frame in ImageSequence.Iterator(pil):
                frames.append(np.asarray(frame.convert("RGB")))
                durations.append(frame.info.get("duration"))
        except Exception:
            raise ImageError("the video (an animated image) could not be decoded (truncated or corrupt data)") from None
    timed = [d for d in durations if isinstance(d, (int, float)) and d > 0]
    fps = 1000.0 * len(timed) / sum(timed) if len(timed) == len(durations) else None
    return np.stack(frames), fps


def load_image(image: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode and fully load `image` as RGB, or raise ImageError saying why not."""
    with decoded_image(image, max_pixels) as rgb:
        return rgb


def open_header(data: bytes, what: str) -> Image.Image:
    """Open image bytes of an accepted format, reading the header only (Pillow
    decodes lazily); ImageError if they are not one."""
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ImageError(f"{what}: the image has far too many pixels") from None
    except Exception:
        raise ImageError(f"{what} could not be decoded as an image (not a PNG, JPEG, WebP, GIF, BMP or TIFF, or corrupt); pass {ACCEPTED}") from None


def _check_size(width: int, height: int, max_pixels: int | None) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"the image is empty ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (Moondream 3 looks at images through 12 crops of 378 px at most: downscale it)")


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
    return pixels_key(np.asarray(rgb))


_HASH_WORKERS = 8
_HASH_MIN_CHUNK = 256 << 10  # below this a thread hand-off costs more than it saves
_hash_pool = ThreadPoolExecutor(_HASH_WORKERS, thread_name_prefix="tidal-hash")


def _chunk_digests(data: memoryview) -> list[bytes]:
    """SHA-256 of each of data's chunks (at most one per worker, so one round;
    their size a function of the length alone), hashed in parallel (hashlib
    releases the GIL)."""
    size = max(_HASH_MIN_CHUNK, -(-len(data) // _HASH_WORKERS))
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    if len(chunks) == 1:
        return [hashlib.sha256(data).digest()]
    return list(_hash_pool.map(lambda c: hashlib.sha256(c).digest(), chunks))


def _tree_key(head: str, data: memoryview) -> str:
    h = hashlib.sha256(head.encode())
    for d in _chunk_digests(data):
        h.update(d)
    return h.hexdigest()[:32]


def pixels_key(pixels: np.ndarray) -> str:
    """Content hash of uint8 pixels [H, W, C], read in place: SHA-256 of the
    shape and of each chunk's SHA-256. A 1080p image is ~6 MB: 1 MiB chunks
    on 4 threads took two rounds, 3.6-4.6 ms of the first output on the H100
    host; one round of 8 took ~1 ms."""
    return _tree_key(f"{pixels.shape}", memoryview(np.ascontiguousarray(pixels)).cast("B"))


class FileBytes(bytes):
    """A file's bytes, read once: decoding errors name the file."""


def encoded_source(image: Any) -> tuple[str, Any] | None:
    """For an image given encoded (bytes, a file path, base64 text): a key of
    that encoded form and what to decode it from later (a file's bytes as read
    now, so the key and the pixels cannot disagree); None for a decoded image
    (PIL, array). Raises ImageError for a path with no file."""
    if isinstance(image, Base64Image):
        try:
            text = image.text.encode("ascii")
        except UnicodeEncodeError:
            raise ImageError(f"{image.field} is not valid base64") from None
        return _tree_key(f"base64 {len(text)}", memoryview(text)), image
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise ImageError(f"no image file at {str(path)!r}")
        data = FileBytes(path.read_bytes())
    else:
        return None
    return bytes_key(data), data


def pixels_or_deferred(
    image: Any, known: "DecodedKeys | None", max_pixels: int | None, decode: Callable[[Any], np.ndarray], describe: Callable[[np.ndarray], Any]
) -> tuple[np.ndarray | Deferred, Any]:
    """A new image's pixels and describe(pixels) (its key, and whatever else
    the model derives from them), remembered in `known` under its encoded
    form's key and the pixel limit (an image seen under another limit is
    decoded, and checked, again) when it came encoded. Seen before: (a
    Deferred decode, what describe gave then), so the caller decodes only if
    the prefix cache lacks the image. known None (no prefix cache): always
    decoded. What is decoded is what was hashed: a file is read once."""
    source = encoded_source(image) if known is not None else None
    if source is None:
        pixels = decode(image)
        return pixels, describe(pixels)
    key, data = source[0] + f" under {max_pixels}", source[1]
    seen = known.get(key)
    if seen is not None:
        return Deferred(lambda: decode(data)), seen
    pixels = decode(data)
    info = describe(pixels)
    known.put(key, info)
    return pixels, info


def bytes_key(data: bytes) -> str:
    """Content hash of an encoded image's bytes (a key for remembering which
    pixels key these bytes decode to; never a prefix-cache key itself)."""
    return _tree_key(f"encoded {len(data)}", memoryview(data))


class DecodedKeys:
    """What recently decoded encoded images (by their encoded form's key, see
    encoded_source) decoded to: their pixels key, and whatever else a model
    derives from the pixels' size. A bounded, least-recently-used map, shared
    by request threads. With it an image sent again as the same bytes or text
    is known before it is decoded, so it need not be decoded while the prefix
    cache holds it."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._known: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source_key: str) -> Any:
        """What source_key decoded to, or None."""
        with self._lock:
            value = self._known.get(source_key)
            if value is not None:
                self._known.move_to_end(source_key)
            return value

    def put(self, source_key: str, value: Any) -> None:
        with self._lock:
            self._known[source_key] = value
            self._known.move_to_end(source_key)
            while len(self._known) > self.capacity:
                self._known.popitem(last=False)
