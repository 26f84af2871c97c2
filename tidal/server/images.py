"""Images as clients send them: data URLs (base64) or, when allowed, local paths."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from PIL import Image

from tidal.errors import ImageError
from tidal.images import load_image
from tidal.server.config import ServerConfig


def decode_image_url(url: str, config: ServerConfig) -> Image.Image:
    """A `data:image/...;base64,...` URL (or bare base64), or a local file path
    (plain or file://) when the server allows local files -> checked RGB image."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise ImageError("image_url data URLs must be base64: data:image/<type>;base64,<data>")
        return _from_base64(payload, config)
    if url.startswith(("http://", "https://")):
        raise ImageError("remote image URLs are not fetched; send the image as a data URL (data:image/jpeg;base64,...)")
    if url.startswith("file://") or url.startswith("/"):
        if not config.allow_local_files:
            raise ImageError("local file paths are off on this server (start it with --allow-local-files); send a data URL")
        path = Path(url.removeprefix("file://"))
        if path.is_file() and path.stat().st_size > config.max_image_bytes:
            raise ImageError(f"the image file is {path.stat().st_size} bytes; the limit is {config.max_image_bytes}")
        return load_image(path, max_pixels=config.max_image_pixels)
    return _from_base64(url, config)


def _from_base64(payload: str, config: ServerConfig) -> Image.Image:
    if len(payload) * 3 // 4 > config.max_image_bytes + 3:
        raise ImageError(f"the image is over {config.max_image_bytes} bytes; the limit is {config.max_image_bytes}")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image_url is not valid base64 ({exc})") from exc
    return load_image(data, max_pixels=config.max_image_pixels)
