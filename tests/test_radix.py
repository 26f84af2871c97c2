"""The radix prefix cache on its own."""

from __future__ import annotations

from tidal.cache.kv_pool import SlotAllocator
from tidal.cache.radix import RadixCache
from tidal.core import CoordInput, ImageRef
from tidal.engine.prefix_keys import position_keys


def _cache(n: int = 100) -> tuple[RadixCache, SlotAllocator]:
    alloc = SlotAllocator(n)
    return RadixCache(alloc), alloc


def test_insert_match_and_split():
    cache, alloc = _cache()
    a = alloc.alloc(5)
    present, slots, node = cache.insert([1, 2, 3, 4, 5], a)
    assert present == 0 and slots == a and cache.size == 5
    assert cache.match([1, 2, 3, 9])[0] == a[:3]  # splits the node after 3 keys
    b = alloc.alloc(4)
    present, slots, _ = cache.insert([1, 2, 3, 7, 8], b[:1] + b[1:3] + b[3:4] + [alloc.alloc(1)[0]])
    assert present == 3 and slots[:3] == a[:3]  # the cached copy wins for the shared prefix
    assert cache.size == 7
    assert cache.match([1, 2, 3, 7, 8, 0])[0] == slots
    assert cache.match([2])[0] == []


def test_locked_paths_are_not_evicted_and_lru_goes_first():
    cache, alloc = _cache()
    _, _, old = cache.insert([1, 2], alloc.alloc(2))
    _, _, locked = cache.insert([5, 6, 7], alloc.alloc(3))
    _, _, new = cache.insert([9], alloc.alloc(1))
    cache.lock(locked)
    assert cache.locked == 3 and cache.evictable == 3
    free_before = alloc.available
    assert cache.evict(1) == 2  # the least recently used unlocked leaf: [1, 2]
    assert alloc.available == free_before + 2
    assert cache.match([1, 2])[0] == [] and cache.match([9])[0] != []
    assert cache.clear() == 1 and cache.size == 3  # only the locked path is left
    cache.unlock(locked)
    assert cache.evictable == 3 and cache.clear() == 3 and alloc.available == alloc.capacity


def test_evicting_a_leaf_exposes_its_parent():
    cache, alloc = _cache()
    cache.insert([1, 2, 3], alloc.alloc(3))
    cache.insert([1, 2, 4], alloc.alloc(3))  # splits into [1, 2] -> {[3], [4]}
    assert cache.size == 4
    assert cache.evict(4) == 4 and cache.size == 0


def test_position_keys_give_each_bidirectional_prefix_its_own_keys():
    image = ImageRef(payload=None, key="abc", length=3)
    keys = position_keys([0, image, 15, CoordInput(0.5)], bidir_len=4)
    prefix = (0, ("image", "abc", 3))
    assert keys == [("bidir", prefix, 0), ("bidir", prefix, 1), ("bidir", prefix, 2), ("bidir", prefix, 3), 15, ("coord", 0.5)]
    assert position_keys([0, 15], bidir_len=0) == [0, 15]  # text-only BOS differs from BOS before an image
    other = position_keys([0, ImageRef(payload=None, key="xyz", length=3), 15], bidir_len=4)
    assert other[0] != keys[0]  # not even BOS is shared between images
    assert other[4] == keys[4]  # text after the prefix keys by token id


def test_a_prefix_of_another_image_is_never_matched():
    cache, alloc = _cache(2000)
    a = position_keys([0, ImageRef(payload=None, key="a", length=729), 1, 2], bidir_len=730)
    b = position_keys([0, ImageRef(payload=None, key="b", length=729), 1, 2], bidir_len=730)
    cache.insert(a, alloc.alloc(len(a)))
    assert cache.match(b)[0] == []
    assert len(cache.match(a[:731])[0]) == 731


def test_holds_reads_without_changing_the_tree():
    """holds (the API thread's hint) answers whether every key is cached, inside
    a node's run too, and neither splits a node nor touches recency."""
    cache, alloc = _cache()
    cache.insert([1, 2, 3, 4, 5], alloc.alloc(5))
    cache.insert([1, 2, 3, 7], alloc.alloc(4))  # splits after 3: [1 2 3] -> [4 5], [7]
    before = [(n.keys, n.last_used) for n in cache._leaves()]
    assert cache.holds([1, 2, 3, 4, 5]) and cache.holds([1, 2, 3, 4]) and cache.holds([1, 2, 3, 7]) and cache.holds([])
    assert not cache.holds([1, 2, 3, 4, 5, 6]) and not cache.holds([1, 2, 9]) and not cache.holds([2])
    assert [(n.keys, n.last_used) for n in cache._leaves()] == before
    assert len(cache.root.children[1].children) == 2  # no new split
    cache.evict(cache.size)
    assert not cache.holds([1, 2, 3])
