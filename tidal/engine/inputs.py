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


def position_keys(items: list[InputItem], bidir_len: int) -> list[Hashable]:
    """One prefix-cache key per position. Images key by content hash; keys in
    the bidirectional prefix are tagged, since those positions' K/V depend on
    the whole prefix (BOS before an image is not BOS before text)."""
    keys: list[Hashable] = []
    for item in items:
        if isinstance(item, int):
            keys.append(item)
        elif isinstance(item, (ImageInput, ImageRef)):
            keys.extend((item.key, i) for i in range(len(item)))
        elif isinstance(item, CoordInput):
            keys.append(("coord", item.value))
        else:
            keys.append(("size", item.width, item.height))
    for i in range(min(bidir_len, len(keys))):
        keys[i] = ("bidir", keys[i])
    return keys
