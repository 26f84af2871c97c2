"""Prefix-cache keys: one hashable key per position of a prompt."""

from __future__ import annotations

from collections.abc import Hashable

from tidal.core import CoordInput, ImageInput, ImageRef, InputItem


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
