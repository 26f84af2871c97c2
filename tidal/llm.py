"""tidal.LLM: plain text generation for any supported model, as in vLLM.

    llm = tidal.LLM.from_pretrained("path/or/hf-repo")
    outs = llm.generate(["The sea is", {"prompt_token_ids": [1, 2, 3]}], tidal.SamplingParams(max_tokens=32))
    outs[0]["text"], outs[0]["token_ids"], outs[0]["finish_reason"], outs[0]["usage"]

Requests run batched on the engine; outputs come back in request order.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from tidal.api import resolve_device_dtype
from tidal.chat_template import ChatTemplate
from tidal.core import Deferred, ImageRef, InputItem, items_len
from tidal.engine.engine import Engine, EngineConfig
from tidal.engine.generate import GenerateSkill
from tidal.engine.loop import EngineLoop, RequestHandle
from tidal.engine.request import Request
from tidal.engine.sampling import SamplingParams
from tidal.errors import InvalidRequestError, PromptTooLongError
from tidal.images import (
    DEFAULT_MAX_PIXELS,
    DecodedKeys,
    decoded_pixels,
    pixels_key,
    pixels_or_deferred,
)
from tidal.models.checkpoint import read_json, resolve_checkpoint
from tidal.models.registry import architecture, load_model
from tidal.validation import check_text


class LLM:
    def __init__(self, model: Any, tokenizer: Tokenizer | None, eos_ids: Sequence[int], engine_config: EngineConfig | None = None, chat_template: ChatTemplate | None = None) -> None:
        self.model, self.tokenizer, self.chat_template = model, tokenizer, chat_template
        self.eos_ids = tuple(eos_ids)
        self.engine = Engine(model, engine_config)
        self.loop = EngineLoop(self.engine)
        self._decoded_keys = DecodedKeys()  # an image's bytes -> (pixels key, height, width)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike[str],
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        engine_config: EngineConfig | None = None,
    ) -> LLM:
        """Any supported checkpoint (config.json's `architectures` decides), a
        local folder or a Hugging Face repo id."""
        dev, dt = resolve_device_dtype(device, dtype)
        folder = resolve_checkpoint(path_or_repo)
        arch = architecture(folder)
        model = load_model(folder, dev, dt)
        if arch == "HfMoondream":
            from tidal.models.moondream3.tokenizer import load_tokenizer

            return cls(model, load_tokenizer(folder), (model.config.tokenizer.eos_id,), engine_config)
        return cls(model, _tokenizer(folder), _eos_ids(folder), engine_config, ChatTemplate.from_folder(folder))

    def close(self) -> None:
        """Stop the engine thread (requests still running fail)."""
        self.loop.close()

    # -- generation ------------------------------------------------------------------
    def generate(self, requests: Any, sampling_params: SamplingParams | None = None, ignore_eos: bool = False) -> list[dict[str, Any]]:
        """requests: a prompt string, {"prompt": str} or {"prompt_token_ids": [...]},
        or a list of them -> one output per request, in order: {"text",
        "token_ids", "finish_reason", "usage": {"prompt_tokens", "completion_tokens"}}.

        Vision models take "images" (one placeholder token per image in the
        prompt) and, for Qwen3-VL, "videos" (one placeholder per video): each
        video is uint8 frames (T, H, W, 3), a list of frames, or {"frames":
        ..., "fps": the clip's frame rate (24 when not given)}; frames are
        sampled at the processor's fps, as transformers does. Video files are
        not decoded here: pass their frames."""
        many = isinstance(requests, (list, tuple))
        prepared = [self._prepare(r, sampling_params, ignore_eos) for r in (requests if many else [requests])]
        handles = [self._submit(*p) for p in prepared]  # everything validated before anything runs
        outs = [self._output(h) for h in handles]
        return outs if many else outs[0]

    def chat(self, messages: Any, sampling_params: SamplingParams | None = None, add_generation_prompt: bool = True, ignore_eos: bool = False, **template_kwargs: Any) -> Any:
        """One conversation ([{"role", "content"}, ...]) or a list of them, through
        the checkpoint's own chat template; extra keyword arguments reach the
        template (e.g. enable_thinking=False). Content may be a list of parts:
        {"type": "text", "text": ...}, {"type": "image", "image": <image>} and,
        for Qwen3-VL, {"type": "video", "video": <video, as generate() takes it>}.
        -> generate's outputs."""
        if self.chat_template is None:
            raise InvalidRequestError("this checkpoint has no chat template (tokenizer_config.json or chat_template.jinja): use generate()")
        many = isinstance(messages, list) and bool(messages) and isinstance(messages[0], list)
        requests = [self._chat_request(m, add_generation_prompt, template_kwargs) for m in (messages if many else [messages])]
        outs = self.generate(requests, sampling_params, ignore_eos)
        return outs if many else outs[0]

    def _chat_request(self, messages: Any, add_generation_prompt: bool, template_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The rendered prompt, with the images ({"type": "image", "image": ...}
        parts) and videos ({"type": "video", "video": ...}) in their order; the
        template sees each as a bare {"type": ...} part and writes its placeholder."""
        media: dict[str, list[Any]] = {"image": [], "video": []}
        if isinstance(messages, list):
            bare = []
            for m in messages:
                if isinstance(m, dict) and isinstance(m.get("content"), list):
                    parts = []
                    for part in m["content"]:
                        kind = part.get("type") if isinstance(part, dict) else None
                        if kind in media:
                            if kind not in part:
                                raise InvalidRequestError(f"a {kind} part carries its {kind} under {kind!r}: {{'type': {kind!r}, {kind!r}: ...}}")
                            media[kind].append(part[kind])
                            part = {"type": kind}
                        parts.append(part)
                    m = {**m, "content": parts}
                bare.append(m)
            messages = bare
        request: dict[str, Any] = {"prompt": self.chat_template.render(messages, add_generation_prompt, **template_kwargs)}
        if media["image"]:
            request["images"] = media["image"]
        if media["video"]:
            request["videos"] = media["video"]
        return request

    def submit(self, request: Any, sampling_params: SamplingParams | None = None, ignore_eos: bool = False) -> RequestHandle:
        """Validate and queue one request without waiting (the server's entry point)."""
        return self._submit(*self._prepare(request, sampling_params, ignore_eos))

    def stream(self, request: Any, sampling_params: SamplingParams | None = None, ignore_eos: bool = False) -> Iterator[str]:
        """Text chunks of one request as they are generated."""
        handle = self._submit(*self._prepare(request, sampling_params, ignore_eos))
        try:
            for kind, payload in handle.events():
                if kind == "text":
                    yield payload
        finally:
            if not handle.done:
                handle.cancel()

    def _prepare(self, request: Any, params: SamplingParams | None, ignore_eos: bool) -> tuple[GenerateSkill, list[int]]:
        if isinstance(request, str):
            request = {"prompt": request}
        if not isinstance(request, dict):
            raise InvalidRequestError(f"a request is a prompt string or a dict with 'prompt' or 'prompt_token_ids', got {type(request).__name__}")
        unknown = set(request) - {"prompt", "prompt_token_ids", "images", "videos"}
        if unknown:
            raise InvalidRequestError(f"unknown request fields {sorted(unknown)}; use 'prompt' or 'prompt_token_ids', and 'images' or 'videos'")
        if "images" in request and not hasattr(self.model, "image_tokens"):
            raise InvalidRequestError(f"{type(self.model).__name__} takes text only here: drop 'images'")
        if "videos" in request and not hasattr(self.model, "prepare_video"):
            raise InvalidRequestError(f"{type(self.model).__name__} takes no videos: drop 'videos'")
        if ("prompt" in request) == ("prompt_token_ids" in request):
            raise InvalidRequestError("give exactly one of 'prompt' and 'prompt_token_ids'")
        if "prompt" in request:
            if self.tokenizer is None:
                raise InvalidRequestError("this checkpoint has no tokenizer.json: pass prompt_token_ids")
            ids = self.tokenizer.encode(check_text(request["prompt"], "prompt", 1 << 20), add_special_tokens=False).ids
        else:
            ids = request["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise InvalidRequestError("prompt_token_ids must be a list of ints")
            ids = list(ids)
        vocab = self.model.vocab_size
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if any(not 0 <= i < vocab for i in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        for key, token in (("images", getattr(self.model, "image_token_id", None)), ("videos", getattr(getattr(self.model, "video", None), "video_token_id", None))):
            if key not in request and token is not None and token in ids:
                raise InvalidRequestError(f"the prompt holds {ids.count(token)} {key[:-1]} placeholders (token {token}) but no {key}: pass them as {key!r}")
        items = self._with_images(ids, request.get("images")) if "images" in request else list(ids)
        if "videos" in request:
            items = self._with_videos(items, request["videos"])
        p = SamplingParams(**vars(params)) if params is not None else SamplingParams()
        n = items_len(items)
        if p.max_tokens is None:  # up to the context (the server's default for chat)
            p.max_tokens = max(1, self.model.max_context - n)
        p.validate(vocab, self.model.max_context)
        if n + p.max_tokens > self.model.max_context:
            raise PromptTooLongError(f"the prompt ({n} positions) and max_tokens ({p.max_tokens}) exceed the context of {self.model.max_context}")
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        return GenerateSkill(self.tokenizer, p, seed, self.eos_ids, ignore_eos), items

    def _with_images(self, ids: list[int], images: Any) -> list[InputItem]:
        """Each image placeholder token in `ids` (one per image, as the chat
        template writes it) becomes the image's positions, in order."""
        if not isinstance(images, (list, tuple)):
            raise InvalidRequestError("'images' must be a list of images (paths, bytes, PIL images or arrays)")
        token = self.model.image_token_id
        slots = [i for i, t in enumerate(ids) if t == token]
        if len(slots) != len(images):
            raise InvalidRequestError(f"the prompt holds {len(slots)} image placeholders (token {token}) for {len(images)} images: one per image")
        refs = [self._image_ref(image) for image in images]
        items: list[InputItem] = list(ids)
        for slot, ref in zip(reversed(slots), reversed(refs)):
            items[slot] = ref
        for slot, ref in zip(slots, refs):
            # (a prompt's last position is always fed, so an image there is always encoded)
            if isinstance(ref.payload, Deferred) and (slot == len(items) - 1 or not self.engine.prefix_cached(items[: slot + 1], 0)):
                ref.payload.get()  # known bytes, but the prompt up to it is not cached: decode here, not on the engine's thread
        return items

    def _image_ref(self, image: Any) -> ImageRef:
        """An image as the engine takes it. Bytes (or a file) decoded before are
        known by their bytes' hash: their pixels become a deferred decode, made
        only if the prefix cache does not hold the image when it is needed."""
        known = self._decoded_keys if self.engine.prefix_cache is not None else None
        pixels, (key, height, width) = pixels_or_deferred(image, known, DEFAULT_MAX_PIXELS, _decode, lambda p: (pixels_key(p), *p.shape[:2]))
        n, grid = self.model.image_tokens(height, width)
        rope, advance = self.model.image_rope(grid)
        return ImageRef(pixels, key, n, rope=rope, rope_advance=advance)

    def _with_videos(self, items: list[InputItem], videos: Any) -> list[InputItem]:
        """Each video placeholder token (one per video, as the chat template
        writes it) becomes the video's frame groups, each as its processor
        writes it into the prompt: `<{t:.1f} seconds>`, vision start, the
        group's positions, vision end."""
        if not isinstance(videos, (list, tuple)):
            raise InvalidRequestError("'videos' must be a list of videos: each uint8 frames (T, H, W, 3), a list of frames, or {'frames': ..., 'fps': ...}")
        spec = self.model.video
        slots = [i for i, t in enumerate(items) if isinstance(t, int) and t == spec.video_token_id]
        if len(slots) != len(videos):
            raise InvalidRequestError(f"the prompt holds {len(slots)} video placeholders (token {spec.video_token_id}) for {len(videos)} videos: one per video")
        if videos and self.tokenizer is None:
            raise InvalidRequestError("videos need the checkpoint's tokenizer.json (frame times are text in the prompt)")
        expanded: list[list[InputItem]] = []
        for video in videos:
            frames, fps = _video_frames(video)
            prepared = self.model.prepare_video(frames, fps)
            n, grid = prepared.grid[0] * prepared.grid[1] // spec.processor.merge_size**2, (1, *prepared.grid)
            rope, advance = self.model.image_rope(grid)
            part: list[InputItem] = []
            for group, t in zip(prepared.groups, prepared.timestamps):
                part += self.tokenizer.encode(f"<{t:.1f} seconds>", add_special_tokens=False).ids
                part += [spec.vision_start_id, ImageRef(group, "video:" + pixels_key(group.frames), n, rope=rope, rope_advance=advance), spec.vision_end_id]
            expanded.append(part)
        out: list[InputItem] = []
        last = 0
        for slot, part in zip(slots, expanded):
            out += items[last:slot] + part
            last = slot + 1
        return out + items[last:]

    def _submit(self, skill: GenerateSkill, items: list[InputItem]) -> RequestHandle:
        pages = self.engine.allocator.capacity
        if items_len(items) > pages:
            raise PromptTooLongError(f"the prompt takes {items_len(items)} positions but the KV cache holds {pages} pages")
        return self.loop.submit(Request(skill=skill, pending=list(items), bidir_len=0))

    @staticmethod
    def _output(handle: RequestHandle) -> dict[str, Any]:
        out = handle.wait()
        req = handle.request
        out["usage"] = {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.skill.completion_tokens}
        return out


def _video_frames(video: Any) -> tuple[np.ndarray, float | None]:
    """A request's video -> (uint8 frames [T, H, W, 3], fps or None)."""
    fps = None
    if isinstance(video, dict):
        if "frames" not in video or set(video) - {"frames", "fps"}:
            raise InvalidRequestError(f"a video dict has 'frames' and optionally 'fps', got keys {sorted(video)}")
        fps = video.get("fps")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise InvalidRequestError(f"a video's fps must be a positive number, got {fps!r}")
        video = video["frames"]
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or 0 in video.shape:
            raise InvalidRequestError(f"video frames as an array are uint8 of shape (T, H, W, 3), got {video.dtype} {video.shape}")
        return video, fps
    if not isinstance(video, (list, tuple)) or not video:
        raise InvalidRequestError("a video is uint8 frames (T, H, W, 3), a non-empty list of frames (images), or {'frames': ..., 'fps': ...}")
    frames = []
    for frame in video:
        with decoded_pixels(frame, DEFAULT_MAX_PIXELS) as pixels:
            frames.append(pixels)
    if len({f.shape for f in frames}) > 1:
        raise InvalidRequestError(f"a video's frames must all have one size, got {sorted({f.shape[1::-1] for f in frames})} (width, height)")
    return np.stack(frames), fps


def _tokenizer(folder: Path) -> Tokenizer | None:
    path = folder / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def _eos_ids(folder: Path) -> tuple[int, ...]:
    """End tokens: generation_config.json's, else config.json's."""
    for name in ("generation_config.json", "config.json"):
        if (folder / name).is_file():
            eos = read_json(folder, name).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return ()


def _decode(image: Any) -> np.ndarray:
    with decoded_pixels(image, DEFAULT_MAX_PIXELS) as pixels:
        return pixels
