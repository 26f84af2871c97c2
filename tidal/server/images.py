"""Images as clients send them: data URLs (base64) or, when the server allows
it, files under one folder. Returns them size-checked as the Python API takes
them (a file's bytes, a data URL's base64 text); the API decodes them (pixel
limit, decode budget), and not at all when it has seen them before and the
image is cached."""

from __future__ import annotations

import stat
from pathlib import Path
from urllib.parse import unquote

from tidal.errors import ImageError
from tidal.images import Base64Image, open_header
from tidal.server.config import ServerConfig


def image_source(url: str, config: ServerConfig, field: str = "image_url") -> bytes | Base64Image:
    """A `data:image/...;base64,...` URL (or bare base64), or a local file path
    (absolute, or file://) under the server's --allow-local-files folder, as
    the Python API takes it: base64 stays text until the API needs the pixels
    (an image sent again is known by the text's hash and not decoded while
    cached). field names the request's part in errors."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise ImageError(f"{field} data URLs must be base64: data:image/<type>;base64,<data>")
        return _base64(payload, config, field)
    if url.startswith(("http://", "https://")):
        raise ImageError(f"remote {field} URLs are not fetched; send the file as a data URL (data:image/<type>;base64,...)")
    if url.startswith("file://") or url.startswith("/") or url.startswith("~"):
        return _local_file(url, config)
    return _base64(url, config, field)


def image_bytes(url: str, config: ServerConfig, field: str = "image_url") -> bytes:
    """image_source's image as bytes (video_url: an animated image, decoded at once)."""
    source = image_source(url, config, field)
    return source.decode() if isinstance(source, Base64Image) else source


def _base64(payload: str, config: ServerConfig, field: str = "image_url") -> Base64Image:
    if any(c in payload for c in " \n\r\t"):
        payload = "".join(payload.split())  # line breaks and spaces, as MIME encoders write them
    if len(payload) * 3 // 4 > config.max_image_bytes + 3:
        raise ImageError(f"the image is over {config.max_image_bytes} bytes; the limit is {config.max_image_bytes}")
    return Base64Image(payload, field)


def _local_file(url: str, config: ServerConfig) -> bytes:
    root = config.local_files_root
    if root is None:
        raise ImageError("local file paths are off on this server (start it with --allow-local-files DIR); send a data URL")
    raw = unquote(url.removeprefix("file://")) if url.startswith("file://") else url
    if raw.startswith("~") or ".." in Path(raw).parts:
        raise ImageError("local image paths may not use '~' or '..'; give the absolute path of a file under the allowed folder")
    base = Path(root).resolve()
    try:
        path = Path(raw).resolve()  # follows symlinks: a link out of the folder stays out
    except (OSError, RuntimeError, ValueError):
        raise _unreadable(raw) from None
    if not path.is_relative_to(base):
        raise ImageError("local image paths must lie under the folder the server allows (after following links)")
    try:
        st = path.stat()
    except (OSError, ValueError):
        raise _unreadable(raw) from None
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        raise _unreadable(raw)  # devices, pipes, folders; /proc files say 0 bytes
    if st.st_size > config.max_image_bytes:
        raise ImageError(f"the image file is {st.st_size} bytes; the limit is {config.max_image_bytes}")
    try:
        with open(path, "rb") as f:
            data = f.read(config.max_image_bytes + 1)
    except (OSError, ValueError):
        raise _unreadable(raw) from None
    if len(data) > config.max_image_bytes:
        raise ImageError(f"the image file is over {config.max_image_bytes} bytes; the limit is {config.max_image_bytes}")
    try:
        open_header(data, "the image file")
    except ImageError:
        raise _unreadable(raw) from None  # "not an image" reads as "not found"
    return data


def _unreadable(raw: str) -> ImageError:
    shown = raw if len(raw) <= 200 else raw[:197] + "..."
    return ImageError(f"no readable image file at {shown!r} under the allowed folder")
