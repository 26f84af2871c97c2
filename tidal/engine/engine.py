"""Engine: continuous batching over one model. Not thread-safe; EngineLoop
drives it from one thread."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace

import torch

from tidal.cache.kv_pool import KVPool, ReqToTokenPool, SlotAllocator
from tidal.cache.radix import RadixCache
from tidal.core import (
    ImageInput,
    ImageRef,
    InputItem,
    Model,
    SeqStep,
    items_len,
    rope_delta,
)
from tidal.engine.ahead import LaunchedStep, confirm, drop, launch_ahead, overlap_on
from tidal.engine.config import EngineConfig
from tidal.engine.prefix_keys import position_keys
from tidal.engine.request import Request, RequestStatus
from tidal.engine.scheduler import CacheFullError, Chunk, Scheduler
from tidal.kernels import triton_available
from tidal.layers.attention import kernels_support, make_backend
from tidal.layers.linear import use_skinny
from tidal.runner.model_runner import Launched, ModelRunner

logger = logging.getLogger(__name__)

# decoder positions of the images one vision-encoder call takes at most (Qwen3-VL: x4 patches)
ENCODE_BATCH_POSITIONS = 16384


def prefill_graph_tokens(token_budget: int) -> int:
    """The largest extend step captured as a graph: the token budget, at least
    1024 (an image prefix may exceed a small budget), at most 4096."""
    return min(max(token_budget, 1024), 4096)


def prefill_warm_sizes(limit: int) -> list[int]:
    """Prompt lengths that make Triton compile what eager prefill steps of up
    to `limit` positions launch: one per MoE block-size row (the table's rows
    end at powers of two) in both of the forms Triton specializes an integer
    argument on (a multiple of 16, and not), from 65 positions up (shorter
    ones replay the decode graphs)."""
    sizes = set()
    p = 128
    while p // 2 < limit:
        top = min(p, limit)
        sizes |= {top, top - 1}
        p *= 2
    return sorted(n for n in sizes if n > 64)


_FAILED = object()  # a step result: the request failed and has been finished


@dataclass
class EngineStats:
    """Running totals for the engine snapshot, and for tests."""

    steps: int = 0
    max_batch: int = 0  # most sequences in one step
    last_chunks: list[tuple[Request, int]] = field(default_factory=list)  # (request, positions) of the last step
    ahead_steps: int = 0  # steps queued ahead of their predecessor's results (EngineConfig.overlap)
    ahead_dropped: int = 0  # sequences of those whose guessed input proved wrong


class Engine:
    def __init__(self, model: Model, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.max_context = model.max_context
        self.kv_dtype = torch.float8_e4m3fn if self.config.kv_dtype == "fp8" else model.dtype  # EngineConfig.kv_dtype
        kernels = self.config.kernels
        head_dim = model.kv_layout.head_dim
        if kernels is None:
            kernels = model.device.type == "cuda" and triton_available()
            if kernels and not kernels_support(head_dim):
                logger.warning("head size %d is not one the Triton kernels take (a power of two >= 16): the torch path runs", head_dim)
                kernels = False
        elif kernels and not kernels_support(head_dim):
            raise ValueError(f"kernels=True: the Triton kernels take head sizes that are powers of two >= 16, this model's is {head_dim}")
        model.use_kernels(kernels)
        use_skinny(self.config.skinny_gemm if kernels and model.device.type == "cuda" else "off")
        self.warmup_s = 0.0
        # a model whose step cannot be captured (it syncs on the device) says so
        graphs = kernels and self.config.cuda_graphs and getattr(model, "cuda_graphs_ok", True) and model.device.type == "cuda"
        if graphs and hasattr(model, "capture_graphs"):
            # the model's own fixed-shape parts (a vision encoder) first: the KV
            # pool is then sized from the memory their graph pool left
            t0 = time.perf_counter()
            model.capture_graphs()
            self.warmup_s += time.perf_counter() - t0
        pages = self.config.kv_pages or self._auto_pages()
        kv = model.kv_layout
        self.kv_pool = KVPool(kv.n_layers, pages, kv.n_kv_heads, kv.head_dim, self.kv_dtype, model.device)
        self.allocator = SlotAllocator(pages)
        self.req_to_token = ReqToTokenPool(self.config.max_running, model.max_context, model.device)
        self.runner = ModelRunner(model, self.kv_pool, self.req_to_token, backend=make_backend(kernels))
        if graphs:
            from tidal.runner.graphs import DecodeGraphs  # imports Triton

            self.runner.graphs = DecodeGraphs(self.runner, self.config.max_running)
            self.warmup_s += self.runner.graphs.capture()
            if self.config.prefill_graphs:
                from tidal.runner.extend_graphs import ExtendGraphs

                self.runner.extend_graphs = ExtendGraphs(self.runner, self.config.max_running, prefill_graph_tokens(self.config.token_budget))
                self.warmup_s += self.runner.extend_graphs.capture()
        # EngineConfig.encode_ahead's stream: every encode runs there, so the encoder's graphs stay in one order
        self._encode_stream = torch.cuda.Stream(model.device) if self.config.encode_ahead and model.device.type == "cuda" else None
        self._ahead: LaunchedStep | None = None  # a step launched before its predecessor's results (EngineConfig.overlap)
        self.prefix_cache = RadixCache(self.allocator) if self.config.prefix_cache else None
        self.scheduler = Scheduler(self.allocator, self.req_to_token, self.config.token_budget, self.prefix_cache)
        self.stats = EngineStats()
        if kernels and self.config.warm_prefill and model.device.type == "cuda":
            t0 = time.perf_counter()
            self._warm_prefill()
            self.warmup_s += time.perf_counter() - t0

    def _warm_prefill(self) -> None:
        """Prefill steps of each prefill_warm_sizes length, one output token
        each; then the prefix cache and the counters are as they were."""
        from tqdm import tqdm

        from tidal.engine.generate import GenerateSkill
        from tidal.engine.sampling import SamplingParams

        vocab = self.model.vocab_size
        sizes = prefill_warm_sizes(min(self.config.token_budget, self.max_context - 2))
        for n in tqdm(sizes, desc="compiling prefill kernels", unit="step"):
            # each prompt its own first token: no prompt is a cached prefix of the next
            prompt = [(k * 7919 + n) % vocab for k in range(n)]
            req = Request(skill=GenerateSkill(None, SamplingParams(temperature=0.0, max_tokens=1), 0, ()), pending=prompt, bidir_len=0)
            self.add_request(req)
            while not req.finished:
                self.step()
            if req.error is not None:
                raise RuntimeError(f"the warm-up prefill of {n} positions failed") from req.error
        self.clear_prefix_cache()
        self.stats = EngineStats()
        self.runner.reset_graph_counters()  # its steps replayed graphs too: counts start with the first request

    def _auto_pages(self) -> int:
        """KV pages from the device memory left after the weights, within the
        process's memory cap (torch.cuda.set_per_process_memory_fraction),
        less a reserve for activations, sampling and CUDA graphs; at most what
        max_running full contexts could use."""
        kv = self.model.kv_layout
        per_token = KVPool.bytes_per_token(kv.n_layers, kv.n_kv_heads, kv.head_dim, self.kv_dtype)
        most = self.config.max_running * self.model.max_context + 1
        dev = self.model.device
        if dev.type != "cuda":
            return max(2, min(self.config.cpu_kv_pages, most))
        free, total = torch.cuda.mem_get_info(dev)
        capped = torch.cuda.get_per_process_memory_fraction(dev) * total - torch.cuda.memory_reserved(dev)
        usable = min(free, capped) - self._reserve_bytes()
        pages = int(max(usable, 0) * self.config.kv_memory_fraction) // per_token
        if pages < self.model.max_context:
            logger.warning("only %d KV pages fit in the device memory left (%.1f GiB); long prompts will wait or be refused", pages, usable / 2**30)
        return max(2, min(pages, most))

    def _reserve_bytes(self) -> int:
        """Memory kept free of the KV pool: a prefill chunk's activations, the
        largest decode batch's logits and sampling buffers, graph pools."""
        vocab = getattr(self.model, "vocab_size", 0)
        graphs = prefill_graph_tokens(self.config.token_budget) * (256 << 10) if self.config.prefill_graphs else 0  # their activations' pool
        return (1 << 30) + self.config.token_budget * (64 << 10) + self.config.max_running * vocab * 16 + graphs

    # -- requests ------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.scheduler.add(req)

    def abort(self, req: Request) -> None:
        if not req.finished:
            req.cancelled = req.error is None
            req.skill.finish_reason = "error" if req.error else "cancelled"
            self._finish(req)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or (self._ahead is not None and self._ahead.any_live())

    # -- one step --------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one batch; return the requests that produced events or finished.
        With EngineConfig.overlap the batch may have been launched by the
        previous call, and the next one is launched before this one's results
        are read."""
        current, self._ahead = self._ahead, None
        if current is not None and not current.any_live():
            current = None  # everyone in it was aborted meanwhile: nothing to read
        if current is None:
            try:
                chunks = self.scheduler.schedule()
            except CacheFullError as exc:
                req = self.scheduler.running[0]
                req.skill.on_context_full()
                logger.warning("%s", exc)
                self._finish(req)
                return [req]
            if not chunks:
                return []
            current = self._launch(chunks)
        self._ahead = launch_ahead(self, current) if overlap_on(self) else None
        results = self._collect(current)
        touched = self._apply(current, results)
        if self._ahead is not None:
            self._ahead = confirm(self, self._ahead, current, results)
        return touched

    def _apply(self, current: LaunchedStep, results: list) -> list[Request]:
        """Hand each live chunk's result to its request's skill; -> the requests touched."""
        chunks = [c for c, live in zip(current.chunks, current.live) if live and c.req.status is RequestStatus.RUNNING]
        st = self.stats
        st.steps += 1
        st.max_batch = max(st.max_batch, sum(current.live))  # the rows that counted (not dropped guesses)
        st.last_chunks = [(c.req, c.n_positions) for c in chunks]
        now = time.monotonic()
        touched = []
        for chunk, result, live in zip(current.chunks, results, current.live):
            req = chunk.req
            if result is _FAILED:  # finished with its error by _launch
                touched.append(req)
                continue
            if not live or req.status is not RequestStatus.RUNNING:
                continue  # a wrong guess, or aborted (or preempted) while its step ran
            req.rope_delta += rope_delta(req.pending[: chunk.n_items])
            req.history.extend(req.pending[: chunk.n_items])
            del req.pending[: chunk.n_items]
            if current.ahead:
                req.ahead -= 1  # its position is in the history now
            self.scheduler.cache_prompt(req)
            if result is None:
                continue
            touched.append(req)
            if result.trace is not None:
                req.trace.append(result.trace)
            if req.first_output_at is None:
                req.first_output_at = now
            try:
                nxt = req.skill.on_output(result)
            except Exception as exc:  # a skill bug fails its own request, not the engine
                logger.exception("skill %s failed on %s", req.skill.name, req.id)
                req.error = exc
                self._finish(req)
                continue
            if nxt is None:
                self._finish(req)
            elif req.num_cached - req.ahead + items_len(nxt) > self.max_context:  # a step launched ahead holds the next position
                req.skill.on_context_full()
                self._finish(req)
            else:
                req.pending = nxt
        return touched

    def kv_usage(self) -> dict[str, int]:
        """Where the KV pages are: free, held by running requests, held by the
        prefix cache (and how many of those no request uses)."""
        cache = self.prefix_cache
        return {
            "capacity": self.allocator.capacity,
            "free": self.allocator.available,
            "requests": self.scheduler.pages_in_use(),
            "cached": cache.size if cache else 0,
            "cached_unused": cache.evictable if cache else 0,
        }

    def snapshot(self) -> dict[str, int]:
        """A consistent set of counters, taken on the engine thread for readers elsewhere."""
        sched, cache = self.scheduler, self.prefix_cache
        return {
            "waiting": len(sched.waiting),
            "running": len(sched.running),
            "steps": self.stats.steps,
            "preemptions": sched.num_preemptions,
            "cache_hit_positions": cache.hits if cache else 0,
            "cache_lookup_positions": cache.lookups if cache else 0,
            **self.kv_usage(),
        }

    def prefix_cached(self, items: list[InputItem], bidir_len: int) -> bool:
        """Whether the prefix cache holds every position of `items` now. Safe to
        read from any thread (the API's, deciding whether an image whose key it
        knows needs decoding): a hint, which the engine thread may make stale
        (the engine then decodes a deferred image itself)."""
        cache = self.prefix_cache
        return cache is not None and cache.holds(position_keys(items, bidir_len))

    def clear_prefix_cache(self) -> int:
        """Drop every cached prefix no running request uses. -> pages freed."""
        return self.prefix_cache.clear() if self.prefix_cache else 0

    def _launch(self, chunks: list[Chunk]) -> LaunchedStep:
        """Launch the scheduled step. If that fails, run its sequences one by
        one so that only the request at fault fails (re-feeding a position
        rewrites the same KV slot, so the retry is exact); the results are
        then a StepResult, None or _FAILED per chunk."""
        try:
            steps, launched = self._forward(chunks)
            return LaunchedStep(chunks, steps, launched, [True] * len(chunks))
        except Exception:
            if len(chunks) > 1:
                logger.exception("engine step of %d sequences failed; retrying them one by one", len(chunks))
        return LaunchedStep(chunks, [], Launched(results=self._one_by_one(chunks)), [True] * len(chunks))

    def _one_by_one(self, chunks: list[Chunk], live: list[bool] | None = None) -> list:
        """Run each (live) chunk as a step of its own; a request whose step
        fails is finished with the error. -> its results, None where not live."""
        out: list = []
        for i, c in enumerate(chunks):
            if live is not None and not (live[i] and c.req.status is RequestStatus.RUNNING):
                out.append(None)
                continue
            try:
                _, launched = self._forward([c])
                out += self.runner.collect(launched)
            except Exception as exc:
                logger.exception("request %s failed", c.req.id)
                c.req.error = exc
                self._finish(c.req)
                out.append(_FAILED)
        return out

    def _forward(self, chunks: list[Chunk]) -> tuple[list[SeqStep], Launched]:
        self._encode_images(chunks)
        steps = [self._seq_step(c) for c in chunks]
        if self._encode_stream is not None:  # this step's images and any encoded ahead before
            torch.cuda.current_stream().wait_stream(self._encode_stream)
        if self.config.encode_ahead:
            self._encode_ahead()  # after the wait: beside this step's forward
        return steps, self.runner.launch(steps, trace=self.config.trace_logits)

    def _collect(self, current: LaunchedStep) -> list:
        """The launched step's results (waiting for its replay). If reading
        them fails, the step launched ahead of them (fed from them) is
        dropped and the step's sequences run again one by one, as a failed
        launch's are (re-feeding a position rewrites the same slot)."""
        try:
            return self.runner.collect(current.launched)
        except Exception:
            logger.exception("reading a step's results failed; running its sequences one by one")
        if self._ahead is not None:
            drop(self, self._ahead)
            self._ahead = None
        return self._one_by_one(current.chunks, current.live)

    def _encode_images(self, chunks: list[Chunk]) -> None:
        """Run the vision encoder for this step's new images, once per distinct image."""
        new: dict[str, ImageRef] = {}
        for c in chunks:
            for item in c.req.pending[: c.n_items]:
                if isinstance(item, ImageRef) and item.key not in new:
                    new[item.key] = item
        done = self._encode(new)
        for c in chunks:
            for i in range(c.n_items):
                item = c.req.pending[i]
                if isinstance(item, ImageRef):
                    c.req.pending[i] = done[item.key]

    def _encode_ahead(self) -> int:
        """Encode the images running requests will prefill next (see
        EngineConfig.encode_ahead); -> how many. An image that fails here is
        left for its own request's step, where the failure is that request's."""
        budget = self.config.token_budget
        refs: dict[str, ImageRef] = {}
        for req in self.scheduler.running:
            if len(req.pending) < 2:
                continue  # decoding: nothing to encode
            for item in req.pending:
                if budget > 0 and isinstance(item, ImageRef) and item.key not in refs:
                    refs[item.key] = item
                    budget -= len(item)
        if not refs:
            return 0
        try:
            done = self._encode(refs)
        except Exception:
            logger.exception("encoding images ahead failed; they are encoded in their own steps")
            return 0
        for req in self.scheduler.running:
            req.pending = [done.get(item.key, item) if isinstance(item, ImageRef) else item for item in req.pending]
        return len(done)

    def _encode(self, refs: dict[str, ImageRef]) -> dict[str, ImageInput]:
        """The vision encoder over `refs`, together where the model batches them
        (ENCODE_BATCH_POSITIONS of decoder positions a call), on the encode
        stream when there is one (the caller makes the step wait for it)."""
        done: dict[str, ImageInput] = {}
        batch: list[ImageRef] = []
        with torch.cuda.stream(self._encode_stream) if self._encode_stream is not None else contextlib.nullcontext():
            for ref in list(refs.values()) + [None]:
                if batch and (ref is None or sum(len(r) for r in batch) + len(ref) > ENCODE_BATCH_POSITIONS):
                    for r, encoded in zip(batch, self.runner.encode_images([r.ready_payload() for r in batch])):
                        done[r.key] = _as_input(encoded, r)
                    batch = []
                if ref is not None:
                    batch.append(ref)
        return done

    def _seq_step(self, c: Chunk) -> SeqStep:
        req = c.req
        start = req.num_cached - c.n_positions  # slots were reserved by the scheduler
        output = req.skill.next_output() if c.completes else None
        assert req.row is not None
        return SeqStep(req.row, start, req.pending[: c.n_items], req.bidir_len, output, req.rope_delta)

    def _finish(self, req: Request) -> None:
        if req.finished:
            return
        if req.skill.finish_reason is None:
            req.skill.finish_reason = "error" if req.error else "stop"
        req.skill.flush()
        self.scheduler.remove(req)
        req.finished_at = time.monotonic()


def _as_input(encoded: torch.Tensor | ImageInput, ref: ImageRef) -> ImageInput:
    """What the model's encode_image gave (embeddings, or an ImageInput with
    extras), as the ImageInput of `ref`'s image."""
    if isinstance(encoded, ImageInput):
        return replace(encoded, key=ref.key)
    return ImageInput(encoded, ref.key, rope=ref.rope, rope_advance=ref.rope_advance)
