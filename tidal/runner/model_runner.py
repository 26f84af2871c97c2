"""ModelRunner: turns one scheduled step into a ForwardBatch, prepares the
attention backend once, runs the model and returns every sequence's outputs
with a single device-to-host transfer. Decode-shaped steps replay CUDA graphs
when they are captured (tidal.runner.graphs). It knows no model by name: the
model is anything with the tidal.core.Model protocol.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from tidal.core import (
    FEED_COORD,
    FEED_SIZE,
    FEED_TOKEN,
    CoordInput,
    ForwardBatch,
    ForwardMode,
    ImageInput,
    InputItem,
    Model,
    OutputSpec,
    OutputTrace,
    SeqStep,
    SizeInput,
    StepResult,
    h2d,
    item_len,
)
from tidal.layers.attention import make_backend
from tidal.runner.sampler import sample

if TYPE_CHECKING:
    from tidal.cache.kv_pool import KVPool, ReqToTokenPool

SEED_MASK = (1 << 63) - 1


class ModelRunner:
    def __init__(self, model: Model, kv_pool: "KVPool", req_to_token: "ReqToTokenPool", backend=None) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.device = model.device
        self.backend = backend if backend is not None else make_backend(False)
        self.graphs = None  # a DecodeGraphs once captured (CUDA)
        self.extend_graphs = None  # an ExtendGraphs once captured (CUDA, EngineConfig.prefill_graphs)

    @property
    def graph_replays(self) -> int:
        """Steps replayed from a CUDA graph, decode and extend."""
        return sum(g.replays for g in (self.graphs, self.extend_graphs) if g is not None)

    def reset_graph_counters(self) -> None:
        for g in (self.graphs, self.extend_graphs):
            if g is not None:
                g.replays = g.eager_runs = 0

    @torch.inference_mode()
    def encode_image(self, payload: object) -> torch.Tensor:
        return self.model.encode_image(payload)

    @torch.inference_mode()
    def encode_images(self, payloads: list[object]) -> list:
        """Several images at once where the model batches its vision encoder
        (an optional `encode_images`), else one by one."""
        if len(payloads) > 1 and hasattr(self.model, "encode_images"):
            return self.model.encode_images(payloads)
        return [self.model.encode_image(p) for p in payloads]

    # -- one step -----------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, steps: list[SeqStep], trace: bool = False, feed: tuple["Launched", list[int], list[int]] | None = None) -> "Launched":
        """Start the step; collect() gives its results. A decode-graph step
        returns while its replay runs; any other step runs to its end here.

        feed (source, idx, kinds): step i feeds one input read off `source`'s
        output for its step idx[i], as Guess.feed kinds[i] says (fed_item):
        the sampled token, or the coordinate or size the model feeds back
        (its placeholder item is of that type; FEED_SAMPLED's is a token). A
        replay in flight feeds it on the device, before its results are back."""
        graphs = self.graphs
        fast = not trace and graphs is not None and graphs.can_run(steps)
        if feed is not None:
            source, idx, kinds = feed
            if fast and source.pending is not None:
                rows = [source.pending.index[j] for j in idx]
                return Launched(pending=graphs.launch(steps, (source.pending, rows, kinds)))
            done = source.results if source.results is not None else self.collect(source)
            steps = [replace(s, items=[self.fed_item(k, done[j])]) for s, j, k in zip(steps, idx, kinds)]  # type: ignore[arg-type]
        if fast:
            return Launched(pending=graphs.launch(steps))
        return Launched(results=self.run(steps, trace=trace))

    def fed_item(self, kind: int, result: StepResult) -> InputItem:
        """What a step fed from `result` feeds for Guess.feed `kind`: the
        sampled token (FEED_TOKEN), else what the model reads off the output
        (Model.fed_back: a CoordInput, a SizeInput, or for FEED_SAMPLED the
        token or what the model feeds for it)."""
        if kind == FEED_TOKEN:
            return result.token
        return self.model.fed_back(kind, result)  # type: ignore[attr-defined]

    def collect(self, launched: "Launched") -> list[StepResult | None]:
        """A launched step's results, waiting for its replay if it runs still."""
        if launched.results is None:
            launched.results = self.graphs.results(launched.pending)
        return launched.results

    @torch.inference_mode()
    def run(self, steps: list[SeqStep], trace: bool = False) -> list[StepResult | None]:
        """Run the step and read back each output-wanting sequence's StepResult.

        trace: also copy each output's raw heads to the host (for tests and
        debugging; costs a transfer of [N, vocab] floats per output).
        """
        if self.graphs is not None and self.graphs.can_run(steps):
            return self.graphs.run(steps, trace=trace)
        if self.extend_graphs is not None and self.extend_graphs.can_run(steps):
            return self.extend_graphs.run(steps, trace=trace)
        hidden = self.forward(steps)
        specs = [s.output for s in steps if s.output is not None]
        results: list[StepResult | None] = [None] * len(steps)
        if not specs:
            return results
        packed, raw = self.outputs(hidden, specs)
        rows = packed.cpu().tolist()  # the step's one device-to-host read
        j = 0
        for i, s in enumerate(steps):
            if s.output is not None:
                tr = OutputTrace({k: v[j].cpu() for k, v in raw.items()}) if trace else None
                results[i] = self.to_result(rows[j], tr)
                j += 1
        return results

    def to_result(self, row: list[int], trace: OutputTrace | None = None) -> StepResult:
        """A packed output row (token, then the model's extras) -> StepResult."""
        extras = self.model.extras_to_result(row[1:]) if len(row) > 1 else {}
        return StepResult(row[0], trace=trace, **extras)

    @torch.inference_mode()
    def forward(self, steps: list[SeqStep]) -> torch.Tensor:
        """Run the step; -> raw hidden states [N, dim] of the last position of
        each sequence that wants an output, in step order."""
        batch = self.build_batch(steps)
        self.backend.prepare(batch)
        batch.attn = self.backend
        hidden = self.model.forward(batch.input_ids, batch.positions, batch)
        out_rows, end = [], 0
        for s, n in zip(steps, batch.q_lens):
            end += n
            if s.output is not None:
                out_rows.append(end - 1)
        return hidden[h2d(out_rows, torch.int64, self.device)]

    def build_batch(self, steps: list[SeqStep]) -> ForwardBatch:
        """Flatten the steps' items into position-level device tensors (one
        host-to-device copy each, none waiting on the device)."""
        self.req_to_token.flush()  # the scheduler's slot assignments, in one copy
        ids: list[int] = []
        positions: list[int] = []
        kinds: list[int] = []
        values: list[tuple[float, float]] = []
        images: list[tuple[int, ImageInput]] = []
        rope3 = getattr(self.model, "rope_axes", 1) == 3
        rope: list[torch.Tensor] = []  # [3, n] pieces, for 3-axis rotary models
        q_lens, kv_lens, bidir, rows = [], [], [], []
        loc_parts: list[torch.Tensor] = []
        for s in steps:
            n = 0
            delta = s.rope_delta
            for item in s.items:
                if rope3:
                    at = s.start_pos + n + delta
                    if isinstance(item, ImageInput) and item.rope is not None:
                        rope.append(item.rope + at)
                        delta += (item.rope_advance or len(item)) - len(item)
                    else:
                        rope.append(torch.arange(at, at + item_len(item)).expand(3, -1))
                if isinstance(item, int):
                    ids.append(item)
                    kinds.append(0)
                    values.append((0.0, 0.0))
                elif isinstance(item, ImageInput):
                    images.append((len(ids), item))
                    ids.extend([0] * len(item))
                    kinds.extend([0] * len(item))
                    values.extend([(0.0, 0.0)] * len(item))
                elif isinstance(item, CoordInput):
                    ids.append(0)
                    kinds.append(FEED_COORD)
                    values.append((item.value, 0.0))
                elif isinstance(item, SizeInput):
                    ids.append(0)
                    kinds.append(FEED_SIZE)
                    values.append((item.width, item.height))
                else:
                    raise TypeError(f"unknown input item {item!r}")
                n += item_len(item)
            positions.extend(range(s.start_pos, s.start_pos + n))
            loc_parts.append(self.req_to_token.table[s.row, s.start_pos : s.start_pos + n])
            q_lens.append(n)
            kv_lens.append(s.start_pos + n)
            bidir.append(s.bidir_len)
            rows.append(s.row)
        dev = self.device
        mode = ForwardMode.DECODE if all(q == 1 for q in q_lens) else ForwardMode.PREFILL if all(q > 1 for q in q_lens) else ForwardMode.MIXED
        has_feedback = any(kinds)
        return ForwardBatch(
            mode=mode,
            input_ids=h2d(ids, torch.int64, dev),
            positions=h2d(positions, torch.int64, dev),
            out_cache_loc=torch.cat(loc_parts),
            q_lens=q_lens,
            kv_lens=kv_lens,
            bidir_lens=bidir,
            req_rows=rows,
            kv_pool=self.kv_pool,
            req_to_token=self.req_to_token.table,
            feedback_kind=h2d(kinds, torch.int64, dev) if has_feedback else None,
            feedback_values=h2d(values, torch.float32, dev) if has_feedback else None,
            image_spans=images,
            rope_positions=_to_device(torch.cat(rope, dim=1), dev) if rope3 else None,
        )

    # -- outputs --------------------------------------------------------------------
    def outputs(self, hidden: torch.Tensor, specs: list[OutputSpec]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """hidden [N, dim] -> (int64 [N, 1 + extras]: the sampled token, then the
        model's extras; and the raw heads, banned ids not masked)."""
        logits, extras, raw = self.model.heads(hidden)
        banned = sorted({b for s in specs for b in s.banned})
        if banned:
            # -inf added at each row's banned ids (scatter_add: indexed assignment would sync)
            bias = [[float("-inf") if b in s.banned else 0.0 for b in banned] for s in specs]
            cols = h2d(banned, torch.int64, self.device).expand(len(specs), -1)
            logits = logits.scatter_add(1, cols, h2d(bias, torch.float32, self.device))
        tokens = sample(
            logits,
            [s.temperature for s in specs],
            [s.top_p for s in specs],
            [s.top_k for s in specs],
            [s.seed & SEED_MASK for s in specs],
            [s.step for s in specs],
        )
        packed = tokens[:, None] if extras is None else torch.cat([tokens[:, None], extras], dim=1)
        return packed, raw


class Launched:
    """A step given to the device: its results (`results`, once known) or the
    decode replay still bringing them (`pending`, a graphs.PendingReplay)."""

    def __init__(self, results: list[StepResult | None] | None = None, pending=None) -> None:
        self.results, self.pending = results, pending


def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A host tensor on `dev` without waiting for the device (pinned, non-blocking)."""
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t
