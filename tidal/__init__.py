"""tidal: a fast inference engine and server for multimodal models on one GPU."""

from tidal.api import EncodedImage, Moondream
from tidal.engine.engine import EngineConfig
from tidal.engine.loop import RequestCancelled, RequestError
from tidal.engine.sampling import SamplingParams
from tidal.errors import (
    CheckpointError,
    ImageError,
    InvalidRequestError,
    PromptTooLongError,
    TidalError,
)
from tidal.llm import LLM

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "EncodedImage",
    "EngineConfig",
    "ImageError",
    "InvalidRequestError",
    "LLM",
    "Moondream",
    "PromptTooLongError",
    "RequestCancelled",
    "RequestError",
    "SamplingParams",
    "TidalError",
    "__version__",
]
