"""ModelRunner: turns one scheduled step into a ForwardBatch, runs the model, and
returns every sequence's outputs with a single device-to-host transfer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidal.cache.kv_pool import KVPool, ReqToTokenPool
from tidal.engine.inputs import CoordInput, ImageInput, InputItem, SizeInput, item_len
from tidal.engine.sampling import sample
from tidal.models.moondream3.model import Moondream3Model
from tidal.runner.forward_batch import ForwardBatch, ForwardMode
from tidal.runner.h2d import h2d

_SEED_MASK = (1 << 63) - 1


@dataclass
class OutputSpec:
    """How to turn a sequence's last hidden state into its next token."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    step: int = 0  # how many tokens this request sampled before; keys the noise
    banned: tuple[int, ...] = ()


@dataclass
class SeqStep:
    """One sequence's share of a step: feed `items` from position `start_pos`.

    Slots for those positions must already be in the request-to-slot table.
    `output` None means no output is needed (a prefill chunk that does not
    finish the prompt).
    """

    row: int
    start_pos: int
    items: list[InputItem]
    bidir_len: int
    output: OutputSpec | None


@dataclass
class OutputTrace:
    """The raw float32 outputs behind a StepResult (kept only when tracing).

    logits: [vocab] before banned ids are masked; coord: [coord bins];
    size: [2, size bins] (width, height).
    """

    logits: torch.Tensor
    coord: torch.Tensor
    size: torch.Tensor


@dataclass
class StepResult:
    """Everything a skill may need from a sequence's last hidden state this step."""

    token: int  # sampled with the OutputSpec
    coord_bin: int  # argmax of the region coordinate logits
    size_bins: tuple[int, int]  # argmax of the region (width, height) logits
    coord_over_eos: bool  # logit(coord) >= logit(eos), the detect/point continue test
    trace: OutputTrace | None = None


class ModelRunner:
    def __init__(self, model: Moondream3Model, kv_pool: KVPool, req_to_token: ReqToTokenPool) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.device = model.device
        tok = model.config.tokenizer
        self.coord_id, self.eos_id = tok.coord_id, tok.eos_id

    @torch.inference_mode()
    def encode_image(self, crops) -> torch.Tensor:
        return self.model.encode_image(crops)

    @torch.inference_mode()
    def forward(self, steps: list[SeqStep]) -> torch.Tensor:
        """Run the step; -> raw hidden states [N, dim] of the last token of each
        sequence that wants an output, in step order."""
        batch, embeds_plan = self._build_batch(steps)
        batch.input_embeds = self._input_embeds(batch.input_ids, embeds_plan)
        hidden = self.model(batch.input_ids, batch.positions, batch)
        out_rows: list[int] = []
        end = 0
        for s in steps:
            end += sum(item_len(i) for i in s.items)
            if s.output is not None:
                out_rows.append(end - 1)
        return hidden[h2d(out_rows, torch.int64, self.device)]

    @torch.inference_mode()
    def run(self, steps: list[SeqStep], trace: bool = False) -> list[StepResult | None]:
        """Run the step and read back each output-wanting sequence's StepResult.

        trace: also copy each output's raw logits to the host (for tests and
        debugging; costs a transfer of [N, vocab] floats).
        """
        hidden = self.forward(steps)
        specs = [s.output for s in steps if s.output is not None]
        results: list[StepResult | None] = [None] * len(steps)
        if not specs:
            return results
        packed, raw = self._outputs(hidden, specs)
        traces = [OutputTrace(*(t[i].cpu() for t in raw)) for i in range(len(specs))] if trace else None
        it = iter(enumerate(packed.cpu().tolist()))
        for i, s in enumerate(steps):
            if s.output is not None:
                j, (tok, cbin, wbin, hbin, cont) = next(it)
                results[i] = StepResult(tok, cbin, (wbin, hbin), bool(cont), traces[j] if traces else None)
        return results

    def _build_batch(self, steps: list[SeqStep]) -> tuple[ForwardBatch, dict]:
        ids: list[int] = []
        positions: list[int] = []
        q_lens, kv_lens, bidir, rows = [], [], [], []
        images: list[tuple[int, torch.Tensor]] = []
        coords: tuple[list[int], list[float]] = ([], [])
        sizes: tuple[list[int], list[list[float]]] = ([], [])
        loc_parts: list[torch.Tensor] = []
        for s in steps:
            n = 0
            for item in s.items:
                t = len(ids)
                if isinstance(item, int):
                    ids.append(item)
                elif isinstance(item, ImageInput):
                    images.append((t, item.embeds))
                    ids.extend([0] * len(item))
                elif isinstance(item, CoordInput):
                    coords[0].append(t)
                    coords[1].append(item.value)
                    ids.append(0)
                elif isinstance(item, SizeInput):
                    sizes[0].append(t)
                    sizes[1].append([item.width, item.height])
                    ids.append(0)
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
        batch = ForwardBatch(
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
        )
        return batch, {"images": images, "coords": coords, "sizes": sizes}

    def _input_embeds(self, input_ids: torch.Tensor, plan: dict) -> torch.Tensor:
        model, dev = self.model, self.device
        x = model.text.embed(input_ids)
        for start, embeds in plan["images"]:
            x[start : start + embeds.shape[0]] = embeds.to(device=dev, dtype=x.dtype)
        rows, values = plan["coords"]
        if rows:
            coord = h2d(values, torch.float32, dev)[:, None]
            x[h2d(rows, torch.int64, dev)] = model.region.encode_coordinate(coord).to(x.dtype)
        rows, values = plan["sizes"]
        if rows:
            size = h2d(values, torch.float32, dev)
            x[h2d(rows, torch.int64, dev)] = model.region.encode_size(size).to(x.dtype)
        return x

    def _outputs(self, hidden: torch.Tensor, specs: list[OutputSpec]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """hidden [N, dim] -> (int64 [N, 5]: token, coord bin, w bin, h bin,
        coord>=eos; and the raw (logits, coord logits, size logits))."""
        model = self.model
        raw_logits = logits = model.text.logits(hidden)
        coord_over_eos = logits[:, self.coord_id] >= logits[:, self.eos_id]
        banned = sorted({b for s in specs for b in s.banned})
        if banned:
            # -inf added at each row's banned ids (scatter_add: indexed assignment would sync)
            bias = [[float("-inf") if b in s.banned else 0.0 for b in banned] for s in specs]
            cols = h2d(banned, torch.int64, self.device).expand(len(specs), -1)
            logits = logits.scatter_add(1, cols, h2d(bias, torch.float32, self.device))  # raw_logits stays unmasked
        tokens = sample(
            logits,
            [s.temperature for s in specs],
            [s.top_p for s in specs],
            [s.top_k for s in specs],
            [s.seed & _SEED_MASK for s in specs],
            [s.step for s in specs],
        )
        coord_logits = model.region.decode_coordinate(hidden)
        size_logits = model.region.decode_size(hidden)
        coord_bin = coord_logits.argmax(dim=-1)
        size_bins = size_logits.argmax(dim=-1)
        packed = torch.stack([tokens, coord_bin, size_bins[:, 0], size_bins[:, 1], coord_over_eos.long()], dim=1)
        return packed, (raw_logits, coord_logits, size_logits)
