"""CUDA graphs for extend steps (prefills, chunks, image prefixes, and steps
mixing them with decode rows), one per token-count bucket and sampling
variant, as DecodeGraphs does for decode steps: eager, such a step pays host
time per kernel launch (an image prefill: ~350 launches, 24 ms wall for 12 ms
of GPU work, measured 2026-11-25).

A step is padded to its bucket. Inputs live in static buffers, filled from
the host in one copy per dtype: per position (token, position, table row,
feedback, 3-axis rotary index, whether it is an image position), per output
sequence (its last row, sampling fields), the extend kernel's block table
(padded with blocks that do nothing), and the images' embeddings (and
per-model extras) copied into a static buffer on the device. Padding
positions feed token 0 at position 0 into the scratch row (slot 0) and attend
to slot 0 only, so their values stay finite; nothing reads them.

`replay=False` runs the very same function eagerly on the same buffers: the
reference that graph replays are compared with (on the CPU, the only path).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from tidal.core import (
    FEED_COORD,
    FEED_SIZE,
    CoordInput,
    ForwardBatch,
    ForwardMode,
    ImageInput,
    SeqStep,
    SizeInput,
    StepResult,
    item_len,
)
from tidal.kernels.extend_attention import EXTEND_BLOCK_M, extend_blocks
from tidal.layers.attention.triton_backend import ExtendMetadata
from tidal.runner.graphs import MAX_BANNED, StepGraphs, outputs

if TYPE_CHECKING:
    from tidal.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

BUCKETS = (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)

# per position: int64 fields, float32 fields
_POS_INTS = ("input_ids", "positions", "rows", "kinds", "image", "rope0", "rope1", "rope2")
_POS_FLOATS = ("value0", "value1")
# per output sequence
_SEQ_INTS = ("out_row", "top_k", "seeds", "steps") + tuple(f"banned{i}" for i in range(MAX_BANNED))
_SEQ_FLOATS = ("temperature", "top_p")
_P = {n: i for i, n in enumerate(_POS_INTS)}
_PF = {n: i for i, n in enumerate(_POS_FLOATS)}
_S = {n: i for i, n in enumerate(_SEQ_INTS)}
_SF = {n: i for i, n in enumerate(_SEQ_FLOATS)}


def max_blocks(tokens: int, sequences: int) -> int:
    """Blocks of the extend kernel's table for `tokens` positions in at most
    `sequences` sequences (each starts a new block) plus the padding."""
    return tokens // EXTEND_BLOCK_M + sequences + 2


class ExtendGraphs(StepGraphs):
    capture_desc = "capturing extend graphs"

    def __init__(self, runner: ModelRunner, max_sequences: int, max_tokens: int, buckets: tuple[int, ...] = BUCKETS) -> None:
        super().__init__(runner)
        model = runner.model
        self.buckets = tuple(sorted({b for b in buckets if b < max_tokens} | {max_tokens}))
        self.max_tokens, self.max_sequences = max_tokens, max_sequences
        dev = runner.device
        pin = dev.type == "cuda"
        t, s = max_tokens, max_sequences
        self.pos_ints = torch.zeros((len(_POS_INTS), t), dtype=torch.int64, device=dev)
        self.pos_floats = torch.zeros((len(_POS_FLOATS), t), dtype=torch.float32, device=dev)
        self.seq_ints = torch.zeros((len(_SEQ_INTS), s), dtype=torch.int64, device=dev)
        self.seq_floats = torch.zeros((len(_SEQ_FLOATS), s), dtype=torch.float32, device=dev)
        self.blocks = torch.zeros((max_blocks(t, s), 6), dtype=torch.int32, device=dev)
        self.hosts = [torch.zeros(b.shape, dtype=b.dtype, pin_memory=pin) for b in (self.pos_ints, self.pos_floats, self.seq_ints, self.seq_floats, self.blocks)]
        self.image_embeds = torch.zeros((t, model.hidden_size), dtype=model.dtype, device=dev)
        k = getattr(model, "image_extra_layers", 0)
        self.image_extra = torch.zeros((k, t, model.hidden_size), dtype=model.dtype, device=dev) if k else None

    def _prepare_capture(self, bucket: int) -> None:
        self._fill([], bucket)
        self._upload()

    # -- one step -------------------------------------------------------------------
    def can_run(self, steps: list[SeqStep]) -> bool:
        extra = self.image_extra
        return (
            sum(item_len(i) for s in steps for i in s.items) <= self.max_tokens
            and len(steps) <= self.max_sequences
            and all(s.output is None or len(s.output.banned) <= MAX_BANNED for s in steps)
            and all(
                isinstance(i, (int, CoordInput, SizeInput))
                or (isinstance(i, ImageInput) and (i.extra is None or (extra is not None and i.extra.shape[0] == extra.shape[0])))
                for s in steps
                for i in s.items
            )
        )

    def run(self, steps: list[SeqStep], replay: bool = True, trace: bool = False) -> list[StepResult | None]:
        n = sum(item_len(i) for s in steps for i in s.items)
        bucket = self.bucket(n)
        sampled = any(s.output is not None and s.output.temperature > 0 for s in steps)
        self.runner.req_to_token.flush()
        out_index = self._fill(steps, bucket)
        self._upload()
        return self._results(self._launch(bucket, sampled, replay), len(steps), out_index, trace)

    def _fill(self, steps: list[SeqStep], bucket: int) -> list[int | None]:
        """The steps into the host buffers (images into the device buffers);
        -> each step's output index (None: no output)."""
        pi, pf, si, sf, blocks = self.hosts
        runner = self.runner
        vocab, scratch = runner.model.vocab_size, runner.req_to_token.scratch_row
        pos = {name: [] for name in _POS_INTS}
        vals: list[tuple[float, float]] = []
        q_lens, kv_lens, bidir, rows = [], [], [], []
        out_index: list[int | None] = []
        outs = 0
        si[:] = 0
        si[_S["banned0"] : _S["banned0"] + MAX_BANNED] = vocab
        sf[:] = 0.0
        sf[_SF["top_p"]] = 1.0
        for s in steps:
            n, delta = 0, s.rope_delta
            start_row = len(pos["input_ids"])
            for item in s.items:
                length = item_len(item)
                at = s.start_pos + n + delta
                rope = torch.arange(at, at + length).expand(3, -1)
                token, kind, v, image = 0, 0, (0.0, 0.0), 0
                if isinstance(item, int):
                    token = item
                elif isinstance(item, CoordInput):
                    kind, v = FEED_COORD, (item.value, 0.0)
                elif isinstance(item, SizeInput):
                    kind, v = FEED_SIZE, (item.width, item.height)
                else:  # an encoded image: its embeddings (and extras) into the device buffers
                    row0 = len(pos["input_ids"])
                    self.image_embeds[row0 : row0 + length].copy_(item.embeds, non_blocking=True)
                    if item.extra is not None and self.image_extra is not None:
                        self.image_extra[:, row0 : row0 + length].copy_(item.extra, non_blocking=True)
                    if item.rope is not None:
                        rope = item.rope + at
                        delta += (item.rope_advance or length) - length
                    image = 1
                pos["input_ids"] += [token] * length
                pos["kinds"] += [kind] * length
                pos["image"] += [image] * length
                vals += [v] * length
                for axis in range(3):
                    pos[f"rope{axis}"].extend(rope[axis].tolist())
                n += length
            pos["positions"].extend(range(s.start_pos, s.start_pos + n))
            pos["rows"].extend([s.row] * n)
            q_lens.append(n)
            kv_lens.append(s.start_pos + n)
            bidir.append(s.bidir_len)
            rows.append(s.row)
            spec = s.output
            if spec is None:
                out_index.append(None)
                continue
            si[_S["out_row"], outs] = start_row + n - 1
            si[_S["top_k"], outs] = spec.top_k
            si[_S["seeds"], outs] = spec.seed & ((1 << 63) - 1)
            si[_S["steps"], outs] = spec.step
            for b, banned in enumerate(spec.banned):
                si[_S["banned0"] + b, outs] = banned
            sf[_SF["temperature"], outs] = spec.temperature
            sf[_SF["top_p"], outs] = spec.top_p
            out_index.append(outs)
            outs += 1
        used = len(pos["input_ids"])
        table = extend_blocks(q_lens, kv_lens, bidir, rows, EXTEND_BLOCK_M)
        # padding positions: token 0 at position 0 of the scratch row, attending to its slot 0 only
        for start in range(used, bucket, EXTEND_BLOCK_M):
            table.append([start, min(EXTEND_BLOCK_M, bucket - start), 0, scratch, 1, 0])
        nb = max_blocks(bucket, self.max_sequences)
        assert len(table) <= nb, (len(table), nb)
        table += [[0, 0, 0, scratch, 0, 0]] * (nb - len(table))  # blocks that do nothing
        pad = bucket - used
        for name in _POS_INTS:
            pos[name] += [scratch if name == "rows" else 0] * pad
        vals += [(0.0, 0.0)] * pad
        pi[:, :bucket] = torch.tensor([pos[name] for name in _POS_INTS], dtype=torch.int64)
        pf[:, :bucket] = torch.tensor(vals, dtype=torch.float32).T if vals else 0.0
        blocks[:nb] = torch.tensor(table, dtype=torch.int32)
        return out_index

    def _upload(self) -> None:
        for dev, host in zip((self.pos_ints, self.pos_floats, self.seq_ints, self.seq_floats, self.blocks), self.hosts):
            dev.copy_(host, non_blocking=True)

    def _step(self, bucket: int, sampled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The captured function: forward over `bucket` positions, then the
        output rows' heads, bans and sampling -> (packed [max_sequences, 1 + extras], raw heads)."""
        runner = self.runner
        model = runner.model
        pi, pf = self.pos_ints[:, :bucket], self.pos_floats[:, :bucket]
        si, sf = self.seq_ints, self.seq_floats
        table = runner.req_to_token.table
        positions = pi[_P["positions"]]
        image_rows = pi[_P["image"]] != 0
        batch = ForwardBatch(
            mode=ForwardMode.MIXED,
            input_ids=pi[_P["input_ids"]],
            positions=positions,
            out_cache_loc=table[pi[_P["rows"]], positions],
            q_lens=[],
            kv_lens=[],
            bidir_lens=[],
            req_rows=[],
            kv_pool=runner.kv_pool,
            req_to_token=table,
            feedback_kind=pi[_P["kinds"]],
            feedback_values=pf.T,
            rope_positions=pi[_P["rope0"] : _P["rope2"] + 1] if getattr(model, "rope_axes", 1) == 3 else None,
            image_rows=image_rows,
            image_embeds=self.image_embeds[:bucket],
            image_extra=self.image_extra[:, :bucket] if self.image_extra is not None else None,
            attn=runner.backend,
            attn_metadata=ExtendMetadata(self.blocks[: max_blocks(bucket, self.max_sequences)]),
        )
        hidden = model.forward(batch.input_ids, positions, batch)
        banned = si[_S["banned0"] : _S["banned0"] + MAX_BANNED].T
        return outputs(model, hidden[si[_S["out_row"]]], banned, sf[_SF["temperature"]], sf[_SF["top_p"]], si[_S["top_k"]], si[_S["seeds"]], si[_S["steps"]], sampled)
