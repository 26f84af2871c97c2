"""What a sequence feeds the model: token ids, or embeddings that replace them."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Union

import torch


@dataclass(frozen=True, eq=False)
class ImageInput:
    """An image's projected embeddings, one position per row: embeds [n, dim].

    `key` is a content hash of the image (and the model), used by the prefix cache.
    """

    embeds: torch.Tensor = field(repr=False)
    key: str

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


@dataclass(frozen=True, eq=False)
class ImageRef:
    """An image not yet encoded: its crops (a processor.Crops) and content key.

    The engine encodes it into an ImageInput of `length` positions before the
    prefill that needs it (or skips that when the prefix cache has it).
    """

    crops: object = field(repr=False)
    key: str
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class CoordInput:
    """A coordinate in [0, 1], fed through the region coordinate encoder."""

    value: float


@dataclass(frozen=True)
class SizeInput:
    """A (width, height) pair, fed through the region size encoder."""

    width: float
    height: float


InputItem = Union[int, ImageInput, ImageRef, CoordInput, SizeInput]


def item_len(item: InputItem) -> int:
    """Positions an item occupies."""
    return len(item) if isinstance(item, (ImageInput, ImageRef)) else 1


def items_len(items: list[InputItem]) -> int:
    return sum(item_len(i) for i in items)


def _item_keys(item: InputItem) -> list[Hashable]:
    if isinstance(item, int):
        return [item]
    if isinstance(item, (ImageInput, ImageRef)):
        return [(item.key, i) for i in range(len(item))]
    if isinstance(item, CoordInput):
        return [("coord", item.value)]
    return [("size", item.width, item.height)]


def _item_identity(item: InputItem) -> Hashable:
    """One compact key for a whole item (an image: its content hash and length)."""
    if isinstance(item, (ImageInput, ImageRef)):
        return ("image", item.key, len(item))
    return _item_keys(item)[0]


def position_keys(items: list[InputItem], bidir_len: int) -> list[Hashable]:
    """One prefix-cache key per position. Images key by content hash.

    Every position of the bidirectional prefix (BOS + image) attends to the
    whole prefix, so its K/V depend on all of it: each of those keys carries
    the whole prefix's identity, and prefixes of different images share no
    position, not even BOS. (The scheduler keeps the prefix in whole items.)
    """
    keys: list[Hashable] = []
    prefix: list[Hashable] = []
    for item in items:
        if len(keys) < bidir_len:
            prefix.append(_item_identity(item))
        keys.extend(_item_keys(item))
    n = min(bidir_len, len(keys))
    if n:
        ident = tuple(prefix)
        keys[:n] = [("bidir", ident, i) for i in range(n)]
    return keys
