"""Server settings (limits, names, what clients may send)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    """max_body_bytes: larger request bodies get 413. max_image_bytes /
    max_image_pixels: larger images get 400. max_queue: requests waiting for
    the engine beyond this get 503 with Retry-After. allow_local_files: let
    OpenAI image_url parts name files on the server's disk (off by default)."""

    model_name: str = "moondream3"
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_queue: int = 256
    retry_after_s: int = 1
    allow_local_files: bool = False
