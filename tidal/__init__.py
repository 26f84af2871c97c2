"""tidal: a fast inference engine and server for multimodal models on one GPU."""

from tidal.api import EncodedImage, Moondream
from tidal.engine.engine import EngineConfig
from tidal.engine.loop import RequestCancelled, RequestError
from tidal.errors import (
    CheckpointError,
    ImageError,
    InvalidRequestError,
    PromptTooLongError,
    TidalError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "EncodedImage",
    "EngineConfig",
    "ImageError",
    "InvalidRequestError",
    "Moondream",
    "PromptTooLongError",
    "RequestCancelled",
    "RequestError",
    "TidalError",
    "__version__",
]
