"""Server settings (limits, names, what clients may send)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tidal.images import DEFAULT_MAX_PIXELS


@dataclass
class ServerConfig:
    """max_body_bytes: larger request bodies get 413. max_image_bytes /
    max_image_pixels: larger images get 400. max_queue: requests waiting for
    the engine beyond this get 503 with Retry-After, counted from when a request
    is accepted (before its image is decoded). local_files_root: image URLs may
    name files under this folder (None: off, the default). request_threads:
    requests validated and their images decoded at once, each in a thread
    (None: anyio's default pool, 40 threads shared with other blocking work)."""

    model_name: str = "moondream3"
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_queue: int = 256
    retry_after_s: int = 1
    local_files_root: Path | None = None
    request_threads: int | None = None
