"""Paged KV cache: one slot per token, a slot allocator and the request-to-slot table.

Pages are one token long. A sequence's K/V may live in any slots; the
request-to-slot table maps (request row, position) to the slot, so prefix
sharing never needs copy-on-write of partly filled pages.
"""

from __future__ import annotations

import numpy as np
import torch

from tidal.core import h2d


class KVPool:
    """K and V for every layer: k[layer] is [num_slots, n_kv_heads, head_dim].

    Slot 0 is reserved as a scratch slot that padded tokens may write into.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_slots, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots

    def write(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V [T, n_kv_heads, head_dim] of T tokens at slots loc [T]
        (into a float8 pool clamped to its finite range first: no scale)."""
        for cache, x in ((self.k[layer], k), (self.v[layer], v)):
            x = self.stored(x)
            if x.dtype == torch.float8_e4m3fn:  # (index_copy_ takes no float8: the same bytes as uint8)
                cache, x = cache.view(torch.uint8), x.view(torch.uint8)
            cache.index_copy_(0, loc, x)

    def stored(self, x: torch.Tensor) -> torch.Tensor:
        """x as the pool stores it (its dtype; float8: clamped to +-448 first,
        as the kernels' cache_value does)."""
        if self.k.dtype == torch.float8_e4m3fn:
            fp8_max = torch.finfo(torch.float8_e4m3fn).max
            x = x.clamp(-fp8_max, fp8_max)
        return x.to(self.k.dtype)

    @staticmethod
    def bytes_per_token(num_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class SlotAllocator:
    """Free list of KV slots (token pages). Slot 0 is never handed out."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, 0, -1))

    @property
    def available(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Slots that can ever be handed out."""
        return self.num_slots - 1

    def alloc(self, n: int) -> list[int] | None:
        """Take n slots, or None (taking nothing) if fewer are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        out = self._free[-n:]
        del self._free[-n:]
        out.reverse()
        return out

    def free(self, slots: list[int]) -> None:
        self._free.extend(reversed(slots))


class ReqToTokenPool:
    """table[row, pos] = KV slot of position `pos` of the request holding `row`.

    One extra row, `scratch_row`, is never handed out: it maps every position
    to slot 0, for the padding rows of a CUDA-graph batch.
    """

    def __init__(self, max_requests: int, max_context: int, device: torch.device | str) -> None:
        self.table = torch.zeros((max_requests + 1, max_context), dtype=torch.int64, device=device)
        self.scratch_row = max_requests
        self._free_rows = list(range(max_requests - 1, -1, -1))
        self.max_requests = max_requests
        self._pending: list[tuple[int, int, list[int]]] = []

    @property
    def available(self) -> int:
        return len(self._free_rows)

    def write(self, row: int, start: int, slots: list[int]) -> None:
        """table[row, start : start + len(slots)] = slots, applied at the next flush()."""
        if start + len(slots) > self.table.shape[1]:  # (flush's flat keys would run into the next row)
            raise IndexError(f"positions {start}..{start + len(slots) - 1} past the table's {self.table.shape[1]}")
        if slots:
            self._pending.append((row, start, slots))

    def flush(self) -> None:
        """Apply the pending writes in one host-to-device copy and one scatter
        (a step schedules one write per request: 256 small copies otherwise).
        Where two writes hit the same entry, the later one wins, as if applied in order."""
        if not self._pending:
            return
        width = self.table.shape[1]
        keys: list[int] = []  # flat entries row * width + col, built in Python: per-write numpy calls cost ~4 us each
        vals: list[int] = []
        for row, start, slots in self._pending:
            base = row * width + start
            keys.extend(range(base, base + len(slots)))
            vals.extend(slots)
        repeated = len({row for row, _, _ in self._pending}) < len(self._pending)  # only writes to one row can collide (each stays in its row)
        self._pending.clear()
        packed = np.array([keys, vals], dtype=np.int64)
        if repeated and len(np.unique(packed[0])) < packed.shape[1]:  # keep each entry's last write
            _, last = np.unique(packed[0, ::-1], return_index=True)
            packed = packed[:, packed.shape[1] - 1 - last]
        packed = h2d(packed, torch.int64, self.table.device)
        self.table.view(-1).index_copy_(0, packed[0], packed[1])

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)
