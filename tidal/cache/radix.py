"""Radix prefix cache: maps key sequences (one hashable key per position) to the
KV slots that hold those positions, so requests sharing a prefix share its KV.

Nodes hold runs of keys and their slots. Running requests lock the path to
their deepest cached node (reference counts); only unlocked leaves are evicted,
least recently used first. The cache owns the slots it holds and returns them
to the allocator on eviction.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence

from tidal.cache.kv_pool import SlotAllocator

_clock = itertools.count()


class Node:
    __slots__ = ("children", "parent", "keys", "slots", "ref", "last_used")

    def __init__(self, parent: "Node | None", keys: list[Hashable], slots: list[int]) -> None:
        self.children: dict[Hashable, Node] = {}
        self.parent = parent
        self.keys = keys
        self.slots = slots
        self.ref = 0
        self.last_used = next(_clock)


class RadixCache:
    def __init__(self, allocator: SlotAllocator) -> None:
        self.allocator = allocator
        self.root = Node(None, [], [])
        self.root.ref = 1  # never evicted
        self.size = 0  # slots held by the tree
        self.locked = 0  # of those, slots on paths some running request locks
        self.hits = 0  # positions served from the cache
        self.lookups = 0  # positions looked up

    # -- lookup ----------------------------------------------------------------
    def match(self, keys: Sequence[Hashable]) -> tuple[list[int], Node]:
        """Longest cached prefix of keys -> (its slots, deepest node covering it).

        Splits a node when the match ends inside it, so the returned node
        covers exactly the matched prefix.
        """
        node, slots, i = self.root, [], 0
        stamp = next(_clock)
        node.last_used = stamp
        while i < len(keys) and keys[i] in node.children:
            child = node.children[keys[i]]
            n = _common(child.keys, keys, i)
            if n < len(child.keys):
                child = self._split(child, n)
            slots.extend(child.slots)
            child.last_used = stamp
            node, i = child, i + n
        return slots, node

    def holds(self, keys: Sequence[Hashable]) -> bool:
        """Whether every one of keys is cached, read without changing the tree
        (no split, no recency stamp): safe to call from another thread than the
        engine's, as a hint that may be stale by the time it is acted on."""
        node, i = self.root, 0
        while i < len(keys):
            child = node.children.get(keys[i])
            if child is None:
                return False
            run = child.keys  # one read: the engine thread may replace it meanwhile
            n = min(len(run), len(keys) - i)
            if run[:n] != list(keys[i : i + n]):
                return False
            node, i = child, i + n
        return True

    def record_lookup(self, looked_up: int, hit: int) -> None:
        self.lookups += looked_up
        self.hits += hit

    # -- insertion -------------------------------------------------------------
    def insert(self, keys: Sequence[Hashable], slots: Sequence[int]) -> tuple[int, list[int], Node]:
        """Cache slots for keys. -> (how many leading positions were already
        cached, the cache's slots for all of keys, the node covering them).

        Where a prefix was already cached, the cache keeps its own slots; the
        caller still owns (and should free) its duplicates for those positions.
        """
        assert len(keys) == len(slots)
        present_slots, node = self.match(keys)
        present = len(present_slots)
        if present < len(keys):
            leaf = Node(node, list(keys[present:]), list(slots[present:]))
            node.children[keys[present]] = leaf
            self.size += len(leaf.slots)
            node = leaf
        return present, present_slots + list(slots[present:]), node

    # -- reference counts --------------------------------------------------------
    def lock(self, node: Node) -> None:
        while node is not self.root:
            if node.ref == 0:
                self.locked += len(node.slots)
            node.ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            node.ref -= 1
            assert node.ref >= 0, "radix cache reference count went negative"
            if node.ref == 0:
                self.locked -= len(node.slots)
            node = node.parent  # type: ignore[assignment]

    # -- eviction ----------------------------------------------------------------
    @property
    def evictable(self) -> int:
        """Slots held only by the cache (no running request locks them)."""
        return self.size - self.locked

    def evict(self, n: int) -> int:
        """Free at least n slots if possible, least recently used leaves first. -> slots freed."""
        leaves = [(x.last_used, id(x), x) for x in self._leaves() if x.ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < n and leaves:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            assert parent is not None
            del parent.children[node.keys[0]]
            self.allocator.free(node.slots)
            freed += len(node.slots)
            self.size -= len(node.slots)
            if parent is not self.root and not parent.children and parent.ref == 0:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))
        return freed

    def clear(self) -> int:
        """Evict everything unlocked. -> slots freed."""
        return self.evict(self.size)

    # -- internals -----------------------------------------------------------------
    def _split(self, child: Node, n: int) -> Node:
        """Cut child after its first n keys; returns the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = Node(parent, child.keys[:n], child.slots[:n])
        upper.ref, upper.last_used = child.ref, child.last_used
        parent.children[upper.keys[0]] = upper
        child.keys, child.slots, child.parent = child.keys[n:], child.slots[n:], upper
        upper.children[child.keys[0]] = child
        return upper

    def _leaves(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                out.append(node)
        return out


def _common(a: list[Hashable], b: Sequence[Hashable], start: int) -> int:
    """Length of the common prefix of a and b[start:]."""
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i
