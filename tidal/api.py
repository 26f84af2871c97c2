"""The Python API: `tidal.Moondream`, shaped like the authors' model and client."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from tidal.core import Deferred, ImageInput, ImageRef, InputItem, items_len
from tidal.engine.engine import Engine, EngineConfig
from tidal.engine.loop import EngineLoop, RequestHandle
from tidal.engine.request import Request
from tidal.engine.sampling import SamplingParams
from tidal.engine.skill import Skill
from tidal.errors import InvalidRequestError, PromptTooLongError
from tidal.images import (
    DEFAULT_MAX_PIXELS,
    DecodedKeys,
    ImageLike,
    decoded_pixels,
    pixels_key,
    pixels_or_deferred,
)
from tidal.models.checkpoint import resolve_checkpoint
from tidal.models.moondream3.model import Moondream3Model
from tidal.models.moondream3.prompts import PromptBuilder
from tidal.models.moondream3.skills import CaptionSkill, LocateSkill, QuerySkill
from tidal.models.moondream3.tokenizer import load_tokenizer
from tidal.models.moondream3.weights import load_model
from tidal.validation import as_int, short_repr

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.5
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_TOKENS = 768
DEFAULT_MAX_OBJECTS = 150
TEXT_SETTINGS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed")
OBJECT_SETTINGS = ("max_objects",)

Prepared = tuple[Skill, list[InputItem], int]  # a validated request: skill, prompt items, bidirectional length

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EncodedImage:
    """An image run through the vision encoder once; pass it to any skill call.

    embeds: [729, text dim] on the model's device. key: content hash.
    """

    def __init__(self, embeds: torch.Tensor, key: str, owner: "Moondream") -> None:
        self.embeds, self.key, self._owner = embeds, key, owner

    def __repr__(self) -> str:
        return f"EncodedImage(key={self.key[:12]}..., positions={self.embeds.shape[0]})"


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """device: "cuda" when available, else "cpu"; dtype: bfloat16 on CUDA, float32 on CPU."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device='cuda' was asked for but torch sees no CUDA device")
    if dtype is None:
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dev, dtype
    if dtype in _DTYPES:
        return dev, _DTYPES[dtype]
    raise InvalidRequestError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")


def text_params(settings: dict[str, Any] | None, vocab_size: int, max_context: int) -> SamplingParams:
    """Validated sampling parameters from a skill call's settings."""
    s = _check_keys(settings, TEXT_SETTINGS)
    stop = s.get("stop", [])
    params = SamplingParams(
        temperature=s.get("temperature", DEFAULT_TEMPERATURE),
        top_p=s.get("top_p", DEFAULT_TOP_P),
        top_k=s.get("top_k", 0),
        max_tokens=s.get("max_tokens", DEFAULT_MAX_TOKENS),
        stop=[stop] if isinstance(stop, str) else stop,
        seed=s.get("seed"),
    )
    return params.validate(vocab_size, max_context)


def max_objects_setting(settings: dict[str, Any] | None, limit: int) -> int:
    n = _check_keys(settings, OBJECT_SETTINGS).get("max_objects", DEFAULT_MAX_OBJECTS)
    return as_int(n, "max_objects", 1, limit)


def _check_keys(settings: dict[str, Any] | None, allowed: tuple[str, ...]) -> dict[str, Any]:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise InvalidRequestError(f"settings must be a dict, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise InvalidRequestError(f"unknown settings {short_repr(unknown, 200)}; accepted here: {', '.join(allowed)}")
    return settings


class Moondream:
    """Moondream 3 on one device, with every skill of the authors' API.

    Calls are thread-safe and may come from many threads at once: they share
    one continuously batched engine running on a background thread.

    max_image_pixels: larger images are refused (checked from the file's
    header, before decoding); None for no limit.
    """

    max_image_pixels: int | None = DEFAULT_MAX_PIXELS

    def __init__(self, model: Moondream3Model, tokenizer: Tokenizer, engine_config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.engine = Engine(model, engine_config)
        self.loop = EngineLoop(self.engine)
        self.prompts = PromptBuilder(tokenizer, model.config)
        self._decoded_keys = DecodedKeys()

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike[str],
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        tokenizer: str | os.PathLike[str] | None = None,
        engine_config: EngineConfig | None = None,
    ) -> "Moondream":
        """Load a checkpoint folder or Hugging Face repo id.

        device: "cuda" when available, else "cpu". dtype: "bfloat16" on CUDA,
        "float32" on CPU; or "float32" / "bfloat16" / "float16".
        """
        dev, dt = resolve_device_dtype(device, dtype)
        folder = resolve_checkpoint(path_or_repo)
        tok = load_tokenizer(folder, tokenizer)
        return cls(load_model(folder, dev, dt), tok, engine_config)

    def clear_cache(self) -> int:
        """Drop cached prefixes (and images) that no running request uses. -> KV pages freed."""
        return self.loop.call(lambda engine: engine.clear_prefix_cache())

    def close(self) -> None:
        """Stop the engine thread (requests still running fail)."""
        self.loop.close()

    # -- images ----------------------------------------------------------------
    def encode_image(self, image: ImageLike | EncodedImage) -> EncodedImage:
        """Run the vision encoder once; the result is reusable across calls."""
        if isinstance(image, EncodedImage):
            return image
        ref = self._image_item(image)
        assert isinstance(ref, ImageRef)
        return EncodedImage(self.engine.runner.encode_image(ref.ready_payload()), ref.key, self)

    def _image_item(self, image: ImageLike | EncodedImage) -> InputItem:
        if isinstance(image, EncodedImage):
            if image._owner is not self:
                raise InvalidRequestError("this EncodedImage was made by another model instance")
            return ImageInput(image.embeds, image.key)
        known = self._decoded_keys if self.engine.prefix_cache is not None else None
        pixels, key = pixels_or_deferred(image, known, self.max_image_pixels, self._pixels, pixels_key)
        # the model crops the pixels when it encodes them: not at all when the image is cached
        ref = ImageRef(pixels, key, self.config.vision.n_image_tokens)
        if isinstance(pixels, Deferred) and not self.engine.prefix_cached(*self.prompts.image_prefix(ref)):
            pixels.get()  # bytes seen before, but the image is not cached: decode here, not on the engine's thread
        return ref

    def _pixels(self, image: ImageLike) -> np.ndarray:
        with decoded_pixels(image, self.max_image_pixels) as pixels:
            return pixels

    # -- skills ----------------------------------------------------------------
    def query(
        self,
        image: ImageLike | EncodedImage | None = None,
        question: str | None = None,
        reasoning: bool = False,
        spatial_refs: Any = None,
        stream: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Answer a question about an image (or, with image None, about text alone).

        -> {"answer": str}, with reasoning {"reasoning": {"text", "grounding"}, "answer"};
        with stream=True the answer is an iterator of text chunks.
        """
        handle = self.submit_query(image, question, reasoning, spatial_refs, settings)
        if not stream:
            return handle.wait()
        events = handle.events()
        out: dict[str, Any] = {}
        if reasoning:
            for kind, payload in events:
                if kind == "reasoning":
                    out["reasoning"] = payload
                    break
        out["answer"] = TextStream(events, handle)
        return out

    def caption(
        self,
        image: ImageLike | EncodedImage,
        length: str = "normal",
        stream: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Describe an image. length: "short", "normal" or "long". -> {"caption": str}."""
        handle = self.submit_caption(image, length, settings)
        if stream:
            return {"caption": TextStream(handle.events(), handle)}
        return handle.wait()

    def detect(self, image: ImageLike | EncodedImage, object: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """Bounding boxes of `object`, normalized to [0, 1]. -> {"objects": [{x_min, y_min, x_max, y_max}]}."""
        return self.submit_detect(image, object, settings).wait()

    def point(self, image: ImageLike | EncodedImage, object: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """Center points of `object`, normalized to [0, 1]. -> {"points": [{x, y}]}."""
        return self.submit_point(image, object, settings).wait()

    # -- batches: submitted together, batched by the engine -------------------------
    def batch_query(self, pairs: Iterable[tuple[Any, str]], reasoning: bool = False, settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Answer many (image, question) pairs concurrently; results in input order."""
        return self._batch(self._prepare_query(img, q, reasoning, None, settings) for img, q in pairs)

    def batch_caption(self, images: Iterable[Any], length: str = "normal", settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Caption many images concurrently; results in input order."""
        return self._batch(self._prepare_caption(img, length, settings) for img in images)

    def batch_detect(self, pairs: Iterable[tuple[Any, str]], settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Detect in many (image, object) pairs concurrently; results in input order."""
        return self._batch(self._prepare_locate(img, obj, settings, True) for img, obj in pairs)

    def batch_point(self, pairs: Iterable[tuple[Any, str]], settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Point in many (image, object) pairs concurrently; results in input order."""
        return self._batch(self._prepare_locate(img, obj, settings, False) for img, obj in pairs)

    def _batch(self, prepared: Iterable[Prepared]) -> list[dict[str, Any]]:
        jobs = list(prepared)  # validate everything before submitting anything
        handles = [self._submit(*job) for job in jobs]
        return [h.wait() for h in handles]

    # -- submission without waiting (the server's entry points) ----------------------
    def submit_query(self, image: Any, question: Any, reasoning: bool = False, spatial_refs: Any = None, settings: dict[str, Any] | None = None) -> RequestHandle:
        return self._submit(*self._prepare_query(image, question, reasoning, spatial_refs, settings))

    def submit_caption(self, image: Any, length: str = "normal", settings: dict[str, Any] | None = None) -> RequestHandle:
        return self._submit(*self._prepare_caption(image, length, settings))

    def submit_detect(self, image: Any, obj: Any, settings: dict[str, Any] | None = None) -> RequestHandle:
        return self._submit(*self._prepare_locate(image, obj, settings, True))

    def submit_point(self, image: Any, obj: Any, settings: dict[str, Any] | None = None) -> RequestHandle:
        return self._submit(*self._prepare_locate(image, obj, settings, False))

    def _prepare_query(self, image: Any, question: Any, reasoning: bool, spatial_refs: Any, settings: dict[str, Any] | None) -> Prepared:
        params = self._text_params(settings)
        item = None if image is None else self._image_item(image)
        items, bidir = self.prompts.query(item, question, bool(reasoning), spatial_refs)
        return QuerySkill(self.tokenizer, self.config.tokenizer, params, self._seed(params), bool(reasoning)), items, bidir

    def _prepare_caption(self, image: Any, length: str, settings: dict[str, Any] | None) -> Prepared:
        params = self._text_params(settings)
        items, bidir = self.prompts.caption(self._image_item(image), length)
        return CaptionSkill(self.tokenizer, self.config.tokenizer, params, self._seed(params)), items, bidir

    def _prepare_locate(self, image: Any, obj: Any, settings: dict[str, Any] | None, with_size: bool) -> Prepared:
        n = max_objects_setting(settings, self.config.text.max_context)
        items, bidir = self.prompts.locate(self._image_item(image), obj, "detect" if with_size else "point")
        return LocateSkill(self.config.tokenizer, n, with_size), items, bidir

    # -- plumbing --------------------------------------------------------------
    def _text_params(self, settings: dict[str, Any] | None) -> SamplingParams:
        return text_params(settings, self.config.text.vocab_size, self.config.text.max_context)

    @staticmethod
    def _seed(params: SamplingParams) -> int:
        return params.seed if params.seed is not None else random.getrandbits(63)

    def _submit(self, skill: Skill, items: list[InputItem], bidir: int) -> RequestHandle:
        pages = self.engine.allocator.capacity
        if items_len(items) > pages:
            raise PromptTooLongError(f"the prompt takes {items_len(items)} positions but the KV cache holds {pages} pages; start the engine with more kv_pages")
        return self.loop.submit(Request(skill=skill, pending=items, bidir_len=bidir))


class TextStream:
    """An iterator over answer text chunks. Closing it early, or dropping it
    (even unread), cancels the request."""

    def __init__(self, events: Iterator[tuple[str, Any]], handle: RequestHandle) -> None:
        self._events, self._handle = events, handle

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            for kind, payload in self._events:
                if kind == "text":
                    return payload
        except BaseException:
            self.close()
            raise
        raise StopIteration

    def close(self) -> None:
        if not self._handle.done:
            self._handle.cancel()

    def __del__(self) -> None:
        self.close()
