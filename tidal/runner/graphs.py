"""CUDA graphs for decode-shaped steps (every sequence feeds one position:
a token, or a coordinate or size fed back by detect, point or reasoning), and
for short causal extends: a sequence feeding n positions past its
bidirectional prefix (a question about a cached image, a prompt chunk) becomes
n rows, row i attending to the first start + i + 1 positions, exactly what
causal attention gives it (all n positions' K/V are written before any row
attends); only its last row's output is read.

One graph per batch-size bucket and sampling variant (greedy-only, or with
temperature sampling), captured at start-up; a step is padded up to its bucket
and replayed. Inputs live in static device buffers, field-major so each field
is a contiguous vector, filled by one pinned host-to-device copy per dtype;
padding rows feed token 0 at position 0 into scratch slot 0 through the
table's scratch row and are ignored.

`replay=False` runs the very same function eagerly on the same buffers: the
reference that graph replays are compared with, bit for bit.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from tidal.core import (
    FEED_COORD,
    FEED_SIZE,
    FEED_TOKEN,
    CoordInput,
    ForwardBatch,
    ForwardMode,
    OutputTrace,
    SeqStep,
    SizeInput,
    StepResult,
    h2d,
)
from tidal.layers.attention.triton_backend import DecodeMetadata
from tidal.runner.sampler import sample_rows

if TYPE_CHECKING:
    from tidal.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 224, 256)
MAX_BANNED = 4  # banned ids per row a graph takes (the skills ban at most 2)

# int64 fields, then float32 fields (rows of the static buffers)
_INTS = ("input_ids", "positions", "rope_delta", "rows", "kv_lens", "kinds", "top_k", "seeds", "steps") + tuple(f"banned{i}" for i in range(MAX_BANNED))
_FLOATS = ("value0", "value1", "temperature", "top_p")
_I = {name: i for i, name in enumerate(_INTS)}
_F = {name: i for i, name in enumerate(_FLOATS)}


class StepGraphs:
    """What decode and extend graphs share: one graph per (bucket, sampled)
    captured largest first into one memory pool, replay or the same function
    run eagerly, and each output read back as ModelRunner.run gives it.
    Subclasses fill their static inputs and define `_step(bucket, sampled)`."""

    buckets: tuple[int, ...]
    capture_desc = "capturing CUDA graphs"

    def __init__(self, runner: "ModelRunner") -> None:
        self.runner = runner
        self.out: dict[tuple[int, bool], tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}  # (packed, raw heads) per graph
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.replays = 0
        self.eager_runs = 0
        self.last_raw: dict[str, torch.Tensor] = {}  # the raw heads of the last run [rows, ...]

    def _step(self, bucket: int, sampled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _prepare_capture(self, bucket: int) -> None:
        """Static inputs of a step of nothing but padding."""
        raise NotImplementedError

    def capture(self, progress: bool = True) -> float:
        """Compile, warm up and capture every (bucket, variant); -> seconds taken."""
        from tqdm import tqdm

        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        todo = [(b, s) for b in sorted(self.buckets, reverse=True) for s in (False, True)]  # largest first: smaller ones reuse its memory
        for bucket, sampled in tqdm(todo, desc=self.capture_desc, disable=not progress, unit="graph"):
            self._prepare_capture(bucket)
            with torch.inference_mode():
                self._step(bucket, sampled)  # compiles the kernels and warms the libraries
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.out[(bucket, sampled)] = self._step(bucket, sampled)
            self.graphs[(bucket, sampled)] = graph
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _launch(self, bucket: int, sampled: bool, replay: bool) -> torch.Tensor:
        """Replay the (bucket, sampled) graph, or run its function eagerly; -> packed outputs."""
        key = (bucket, sampled)
        if replay and key in self.graphs:
            self.graphs[key].replay()
            out, self.last_raw = self.out[key]
            self.replays += 1
        else:
            with torch.inference_mode():
                out, self.last_raw = self._step(bucket, sampled)
            self.eager_runs += 1
        return out

    def _results(self, out: torch.Tensor, rows: int, index: list[int | None], trace: bool) -> list[StepResult | None]:
        """Each step's StepResult from its output row (None: no output): the
        step's one device-to-host read, and with trace each row's raw heads."""
        packed = out[:rows].cpu().tolist()
        results: list[StepResult | None] = []
        for j in index:
            tr = OutputTrace({k: v[j].cpu() for k, v in self.last_raw.items()}) if trace and j is not None else None
            results.append(None if j is None else self.runner.to_result(packed[j], tr))
        return results


class DecodeGraphs(StepGraphs):
    def __init__(self, runner: "ModelRunner", max_batch: int, buckets: tuple[int, ...] = BUCKETS) -> None:
        super().__init__(runner)
        self.buckets = tuple(sorted({b for b in buckets if b < max_batch} | {max_batch}))
        self.max_batch = max_batch
        dev = runner.device
        n = max_batch
        self.ints = torch.zeros((len(_INTS), n), dtype=torch.int64, device=dev)
        self.floats = torch.zeros((len(_FLOATS), n), dtype=torch.float32, device=dev)
        # Two sets of pinned host buffers, used in turn: a step's inputs are
        # written while the previous step's copies (and its results' copy
        # back) may still be queued behind a running graph.
        self._host = [_HostBuffers(n), _HostBuffers(n)]
        self._turn = 0
        self.ints_host, self.floats_host = self._host[0].ints, self._host[0].floats
        self._pad(0, n)

    def _prepare_capture(self, bucket: int) -> None:
        self._pad(0, self.max_batch)

    # -- one step -------------------------------------------------------------------
    def can_run(self, steps: list[SeqStep]) -> bool:
        return sum(len(s.items) for s in steps) <= self.max_batch and all(
            s.start_pos >= s.bidir_len  # causal from the first new position on
            and all(isinstance(item, (int, CoordInput, SizeInput)) for item in s.items)
            and (s.output is None or len(s.output.banned) <= MAX_BANNED)
            for s in steps
        )

    @property
    def last_logits(self) -> torch.Tensor | None:
        """The last run's logits before bans [bucket, vocab] (for tests)."""
        return self.last_raw.get("logits")

    def run(self, steps: list[SeqStep], replay: bool = True, trace: bool = False) -> list[StepResult | None]:
        """Fill the static inputs, replay the bucket's graph (or run it eagerly),
        read the outputs back (the step's one device-to-host read; with trace,
        also each output's raw heads, as ModelRunner.run gives them)."""
        if trace or not replay:
            n, bucket, sampled, last_rows, _ = self._prepare(steps, None)
            return self._results(self._launch(bucket, sampled, replay), n, last_rows, trace)
        return self.results(self.launch(steps))

    @torch.inference_mode()  # its buffers are inference tensors (made in the engine's steps); callers may not be
    def launch(self, steps: list[SeqStep], feed: tuple["PendingReplay", list[int], list[int]] | None = None) -> "PendingReplay":
        """Replay the step's graph and queue its outputs' copy to the host;
        return at once (results() waits for them).

        feed (source, rows, kinds): every step feeds one input read on the
        device off the source replay's output row rows[i] (the source may
        still be running), as Guess.feed kinds[i] says: the sampled token, or
        the values the model feeds back (Model.fed_back_on_device). The step
        after the source, queued before its results are back."""
        n, bucket, sampled, last_rows, host = self._prepare(steps, feed)
        out = self._launch(bucket, sampled, True)
        if host.out is None or host.out.shape[1] != out.shape[1] or host.out.dtype != out.dtype:
            host.out = torch.empty((self.max_batch, out.shape[1]), dtype=out.dtype).pin_memory()
        host.out[:n].copy_(out[:n], non_blocking=True)
        host.done.record()  # past the outputs' copy too
        pending = PendingReplay(n, last_rows, out, host)
        host.owner = pending
        return pending

    def results(self, pending: "PendingReplay") -> list[StepResult | None]:
        """Wait for a launched replay's outputs; -> each step's StepResult (None: no output).
        Read them before the launch after next: it reuses their host buffers."""
        if pending.results is None:
            if pending.host.owner is not pending:
                raise RuntimeError("a decode replay's results were read after two later launches reused their host buffers")
            pending.host.done.synchronize()
            packed = pending.host.out[: pending.rows].tolist()
            pending.results = [None if j is None else self.runner.to_result(packed[j]) for j in pending.index]
        return pending.results

    def _prepare(self, steps: list[SeqStep], feed: tuple["PendingReplay", list[int], list[int]] | None) -> tuple[int, int, bool, list[int | None], "_HostBuffers"]:
        """Flush the table, fill the next host buffers and copy them to the
        static inputs (then the fed tokens, device to device); -> (rows,
        bucket, sampled, each step's output row, the host buffers used)."""
        n = sum(len(s.items) for s in steps)
        bucket = self.bucket(n)
        sampled = any(s.output is not None and s.output.temperature > 0 for s in steps)
        self.runner.req_to_token.flush()  # the scheduler's slot assignments, in one copy
        host = self._host[self._turn]
        self._turn ^= 1
        host.done.synchronize()  # its last copies are done (long since, unless a step was dropped unread)
        host.owner = None  # launch() names the new owner
        self.ints_host, self.floats_host = host.ints, host.floats
        last_rows = self._fill(steps)
        self._pad(n, bucket)
        self.ints.copy_(self.ints_host, non_blocking=True)
        self.floats.copy_(self.floats_host, non_blocking=True)
        host.done.record()  # past the copies out of `host` (launch() records it again later)
        if feed is not None:
            self._feed(steps, *feed)
        return n, bucket, sampled, last_rows, host

    def _feed(self, steps: list[SeqStep], source: "PendingReplay", rows: list[int], kinds: list[int]) -> None:
        """Write into the static inputs, on the device, what each step feeds
        from the source's output row rows[i]: its token and, where kinds[i]
        (a Guess.feed) is not FEED_TOKEN, the feedback kind and values the
        model reads off that row (Model.fed_back_on_device)."""
        n = len(steps)
        assert n == len(rows) == len(kinds) == sum(len(s.items) for s in steps), "a fed step has one position a sequence"
        packed = source.out[:n] if rows == list(range(n)) else source.out[h2d(rows, torch.int64, self.ints.device)]
        self.ints[_I["input_ids"], :n].copy_(packed[:, 0])
        if any(k != FEED_TOKEN for k in kinds):
            fed_kinds, values = self.runner.model.fed_back_on_device(packed, h2d(kinds, torch.int64, self.ints.device))  # [n], [n, 2]
            self.ints[_I["kinds"], :n].copy_(fed_kinds)
            self.floats[_F["value0"] : _F["value1"] + 1, :n].copy_(values.T)

    def _fill(self, steps: list[SeqStep]) -> list[int | None]:
        """Write the steps' rows into the host buffers; -> each step's output row (None: no output)."""
        ints, floats = self.ints_host, self.floats_host
        vocab = self.runner.model.vocab_size
        cols = [[] for _ in _INTS]
        fcols = [[] for _ in _FLOATS]
        none = [vocab] * MAX_BANNED
        last_rows: list[int | None] = []
        n = 0
        for s in steps:
            spec = s.output
            for i, item in enumerate(s.items):
                kind, v0, v1, tok = 0, 0.0, 0.0, 0
                if isinstance(item, int):
                    tok = item
                elif isinstance(item, CoordInput):
                    kind, v0 = FEED_COORD, item.value
                else:
                    kind, v0, v1 = FEED_SIZE, item.width, item.height
                pos = s.start_pos + i
                if spec is not None and i == len(s.items) - 1:
                    banned = list(spec.banned) + [vocab] * (MAX_BANNED - len(spec.banned))
                    ivals = (tok, pos, s.rope_delta, s.row, pos + 1, kind, spec.top_k, spec.seed & ((1 << 63) - 1), spec.step, *banned)
                    fvals = (v0, v1, spec.temperature, spec.top_p)
                else:  # a row whose output nobody reads: greedy, nothing banned
                    ivals = (tok, pos, s.rope_delta, s.row, pos + 1, kind, 0, 0, 0, *none)
                    fvals = (v0, v1, 0.0, 1.0)
                for name, val in zip(_INTS, ivals):
                    cols[_I[name]].append(val)
                for name, val in zip(_FLOATS, fvals):
                    fcols[_F[name]].append(val)
            n += len(s.items)
            last_rows.append(n - 1 if spec is not None else None)
        ints[:, :n] = torch.tensor(cols, dtype=torch.int64)
        floats[:, :n] = torch.tensor(fcols, dtype=torch.float32)
        return last_rows

    def _pad(self, start: int, end: int) -> None:
        """Padding rows: token 0 at position 0 of the scratch row (slot 0), greedy."""
        if end <= start:
            return
        ints, floats = self.ints_host, self.floats_host
        ints[:, start:end] = 0
        ints[_I["rows"], start:end] = self.runner.req_to_token.scratch_row
        ints[_I["kv_lens"], start:end] = 1
        for i in range(MAX_BANNED):
            ints[_I[f"banned{i}"], start:end] = self.runner.model.vocab_size
        floats[:, start:end] = 0.0
        floats[_F["top_p"], start:end] = 1.0

    def _step(self, bucket: int, sampled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The captured function: forward, heads, bans, sampling -> (packed
        [bucket, 1 + extras], the raw heads, logits before bans [bucket, vocab] among them)."""
        runner = self.runner
        model = runner.model
        ints, floats = self.ints[:, :bucket], self.floats[:, :bucket]
        table = runner.req_to_token.table
        rows = ints[_I["rows"]]
        positions = ints[_I["positions"]]
        slots = table[rows, positions]  # each new position's KV slot, gathered on the device
        batch = ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=ints[_I["input_ids"]],
            positions=positions,
            out_cache_loc=slots,
            q_lens=[1] * bucket,
            kv_lens=[],
            bidir_lens=[0] * bucket,
            req_rows=[],
            kv_pool=runner.kv_pool,
            req_to_token=table,
            feedback_kind=ints[_I["kinds"]],
            feedback_values=floats[_F["value0"] : _F["value1"] + 1].T,
            attn=runner.backend,
            attn_metadata=DecodeMetadata(rows, ints[_I["kv_lens"]]),
        )
        if getattr(model, "rope_axes", 1) == 3:  # text rows: the same rotary index on all three axes
            batch.rope_positions = (positions + ints[_I["rope_delta"]]).expand(3, -1)
        hidden = model.forward(batch.input_ids, positions, batch)
        banned = ints[_I["banned0"] : _I["banned0"] + MAX_BANNED].T  # [bucket, MAX_BANNED], vocab = none
        return outputs(model, hidden, banned, floats[_F["temperature"]], floats[_F["top_p"]], ints[_I["top_k"]], ints[_I["seeds"]], ints[_I["steps"]], sampled)


class _HostBuffers:
    """Pinned host memory of one step: its inputs (field-major, as the static
    device buffers), its packed outputs, and the event after their copies."""

    def __init__(self, n: int) -> None:
        self.ints = torch.zeros((len(_INTS), n), dtype=torch.int64).pin_memory()
        self.floats = torch.zeros((len(_FLOATS), n), dtype=torch.float32).pin_memory()
        self.out: torch.Tensor | None = None  # [max_batch, 1 + extras], made at the first launch
        self.done = torch.cuda.Event()  # recorded after the copies in and out of these buffers
        self.done.record()
        self.owner: PendingReplay | None = None  # the launch whose outputs `out` holds


class PendingReplay:
    """A launched decode replay: `rows` rows, each step's output row in
    `index` (None: no output), the graph's static packed outputs `out`
    [bucket, 1 + extras] on the device (valid until the next replay of that
    graph), and the host buffers its outputs come back to."""

    def __init__(self, rows: int, index: list[int | None], out: torch.Tensor, host: _HostBuffers) -> None:
        self.rows, self.index, self.out, self.host = rows, index, out, host
        self.results: list[StepResult | None] | None = None


def outputs(
    model, hidden: torch.Tensor, banned: torch.Tensor, temps: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, sampled: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A graph's tail, for output rows [B, dim]: heads, bans (banned [B,
    MAX_BANNED], vocab_size = none), greedy or sampled tokens -> (packed
    [B, 1 + extras], the raw heads)."""
    logits, extras, raw = model.heads(hidden)
    rows = logits.shape[0]
    mask = torch.zeros((rows, logits.shape[1] + 1), dtype=logits.dtype, device=logits.device).scatter_(1, banned, float("-inf"))
    logits = logits + mask[:, :-1]
    tokens = logits.argmax(dim=-1)
    if sampled:
        drawn = sample_rows(logits, temps, top_p, top_k, seeds, steps)
        tokens = torch.where(temps > 0, drawn, tokens)
    packed = tokens[:, None] if extras is None else torch.cat([tokens[:, None], extras], dim=1)
    return packed, raw
