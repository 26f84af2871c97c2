"""Prompt construction and request validation for the Moondream 3 skills."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer

from tidal.core import CoordInput, InputItem, SizeInput, items_len
from tidal.errors import InvalidRequestError, PromptTooLongError
from tidal.validation import as_float, check_text, short_repr

from .config import MoondreamConfig

SpatialRef = Sequence[float]


class PromptBuilder:
    """Builds each skill's input items. `image` is the image's item (an
    ImageInput or ImageRef) or None for a text-only query."""

    def __init__(self, tokenizer: Tokenizer, config: MoondreamConfig) -> None:
        self.tokenizer = tokenizer
        self.ids = config.tokenizer
        self.templates = config.tokenizer.templates
        self.max_context = config.text.max_context

    def image_prefix(self, image: InputItem) -> tuple[list[InputItem], int]:
        """The prefix every prompt on this image starts with (BOS and the
        image's positions, bidirectional) and its length: what the prefix
        cache holds once one request on the image has run."""
        return self._prefix(image)

    def _prefix(self, image: InputItem | None) -> tuple[list[InputItem], int]:
        """BOS (+ image). With an image, BOS and its positions attend bidirectionally."""
        if image is None:
            return [self.ids.bos_id], 0
        return [self.ids.bos_id, image], 1 + len(image)  # type: ignore[arg-type]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids  # defaults, as the reference encodes

    def query(self, image: InputItem | None, question: str, reasoning: bool, spatial_refs: Any = None) -> tuple[list[InputItem], int]:
        question = check_text(question, "question")
        refs = validate_spatial_refs(spatial_refs, self.max_context)
        if refs and image is None:
            raise InvalidRequestError("spatial_refs need an image to refer to")
        items, bidir = self._prefix(image)
        t = self.templates["query"]
        if reasoning and not t["suffix"]:
            raise InvalidRequestError("this checkpoint's query template has an empty suffix, which reasoning needs to hand over to the answer")
        items += t["prefix"]
        for ref in refs:
            if len(ref) == 2:
                items += [CoordInput(ref[0]), CoordInput(ref[1])]
            else:
                x0, y0, x1, y1 = ref
                items += [CoordInput((x0 + x1) / 2), CoordInput((y0 + y1) / 2), SizeInput(x1 - x0, y1 - y0)]
        items += self._encode(question)
        # Reasoning ends the prompt with the thinking id; the suffix is fed
        # only once reasoning ends (QuerySkill), as the reference does.
        items += [self.ids.thinking_id] if reasoning else list(t["suffix"])
        return self._checked(items), bidir

    def caption(self, image: InputItem, length: str) -> tuple[list[InputItem], int]:
        lengths = self.templates["caption"]
        if not isinstance(length, str) or length not in lengths:
            raise InvalidRequestError(f"unknown caption length {short_repr(length)}; use one of {', '.join(lengths)}")
        items, bidir = self._prefix(image)
        return self._checked(items + list(lengths[length])), bidir

    def locate(self, image: InputItem, obj: str, skill: str) -> tuple[list[InputItem], int]:
        """detect or point: the object is encoded with a leading space."""
        obj = check_text(obj, "object")
        items, bidir = self._prefix(image)
        t = self.templates[skill]
        return self._checked(items + t["prefix"] + self._encode(" " + obj) + t["suffix"]), bidir

    def _checked(self, items: list[InputItem]) -> list[InputItem]:
        n = items_len(items)
        if n >= self.max_context:
            raise PromptTooLongError(
                f"the prompt takes {n} positions but the model's context holds {self.max_context} "
                "(including the image's 730 and at least one generated position); shorten the text"
            )
        return items


def validate_spatial_refs(refs: Any, max_refs: int = 2048) -> list[tuple[float, ...]]:
    """Each ref is a point [x, y] or a box [x_min, y_min, x_max, y_max], all in [0, 1]."""
    if refs is None:
        return []
    if isinstance(refs, (str, bytes)) or not isinstance(refs, Sequence):
        raise InvalidRequestError("spatial_refs must be a list of points [x, y] or boxes [x_min, y_min, x_max, y_max]")
    if len(refs) > max_refs:
        raise InvalidRequestError(f"spatial_refs holds {len(refs)} refs; at most {max_refs} fit in the context")
    out = []
    for i, ref in enumerate(refs):
        if isinstance(ref, (str, bytes)) or not isinstance(ref, Sequence) or len(ref) not in (2, 4):
            raise InvalidRequestError(f"spatial_refs[{i}] must be 2 numbers (a point) or 4 (a box), got {short_repr(ref)}")
        vals = [as_float(v, f"spatial_refs[{i}] values", 0.0, 1.0) for v in ref]
        if len(vals) == 4 and (vals[0] > vals[2] or vals[1] > vals[3]):
            raise InvalidRequestError(f"spatial_refs[{i}] is a box with min > max: {short_repr(ref)}; use [x_min, y_min, x_max, y_max]")
        out.append(tuple(vals))
    return out
