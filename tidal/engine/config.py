"""EngineConfig: the engine's settings, checked where they are made."""

from __future__ import annotations

from dataclasses import dataclass

from tidal.layers.linear import SKINNY_MODES
from tidal.validation import as_float, as_int

KV_DTYPES = ("auto", "fp8")


@dataclass
class EngineConfig:
    """max_running: requests batched at once. kv_pages: KV cache size in
    one-token pages (None: sized from free device memory, or a CPU default).
    token_budget: positions fed per step (a whole image prefix may exceed it).
    prefix_cache: share the KV of common prompt prefixes (images by content).
    trace_logits: keep every output's raw logits on its request (`Request.trace`),
    for tests and debugging.
    kernels: the Triton fast path (fused kernels, paged-attention kernels);
    None: on where the device is CUDA. It is a setting of the model, so the
    last engine made on a model decides for all engines sharing it.
    cuda_graphs: with kernels on CUDA, capture decode steps as CUDA graphs at
    start-up (one per batch-size bucket up to max_running) and replay them.
    prefill_graphs: with cuda_graphs, also capture extend steps (prefills,
    image prefixes, mixed steps) per token-count bucket up to
    prefill_graph_tokens (tidal.runner.extend_graphs); eager, such a step pays
    host time per launch (measured on an H100, Moondream 3's mixed workload at
    concurrency 64: 56.0 requests/s against 36.9, 1.4 s more warm-up).
    warm_prefill: with kernels on CUDA, run a ladder of text prompts through
    the engine at start-up (prefill_warm_sizes) so Triton compiles the prefill
    kernels then, not inside the first requests' steps (measured: 4 s of
    compiles in the first 32 requests of a fresh H100 machine).
    overlap: while a decode step's graph runs, queue the next one behind it
    (each sequence feeding what the running step outputs for it: the token
    it samples, or for detect, point and a reasoning query's grounding the
    coordinate or size, read on the device) before reading the running step's results, so the host's work
    between steps (reading results, the skills, scheduling, filling inputs)
    hides behind the GPU's. Only where every running request's skill says
    what it will feed back, or that its next output is its last (left out
    of the step ahead) (Skill.guess_next), and no waiting request could be
    admitted (a free table row); a guess the results prove wrong (a stop
    string, the answer id that ends a reasoning query's thinking) is dropped, its
    slot given back, and the request goes on in the step after (one step
    later than without). The same steps with the same inputs: the same
    outputs. None (default): on where decode steps replay CUDA graphs, the
    only place it pays (elsewhere the step ahead runs to its end at once);
    True: everywhere (the CPU path too: for tests); False: off.
    encode_ahead: run the vision encoder for the images that admitted
    requests will prefill next (held back by the token budget), up to a token
    budget of positions, while the current step runs: on CUDA on a stream of
    its own, so the encoder (compute-bound) overlaps the step's forward; the
    next step waits for it. The same encodes, earlier. Off until measured.
    skinny_gemm: with kernels on CUDA, which decode-sized projections (up to
    16 rows) run the Triton skinny product instead of cuBLAS: "auto" those
    shapes where it measured faster (routers, lm_heads, both sides >= 4096), "all",
    or "off" (True / False read as "all" / "off"). tidal.layers.linear; a
    process-wide switch: the last engine made decides.
    kv_dtype: what the KV cache stores: "auto" the model's dtype (exact), or
    "fp8" float8 e4m3 with no scale (values clamped to +-448): half the bytes
    of a bf16 cache, so twice the positions in the same memory and half the
    K/V reads of a decode step, at ~3 significant bits per stored value.
    A numerics option: results differ from "auto" (KV_DTYPES)."""

    max_running: int = 64
    kv_pages: int | None = None
    token_budget: int = 2048
    kv_memory_fraction: float = 0.85  # of free GPU memory after weights, when kv_pages is None
    cpu_kv_pages: int = 65536
    prefix_cache: bool = True
    trace_logits: bool = False
    kernels: bool | None = None
    cuda_graphs: bool = True
    prefill_graphs: bool = True
    skinny_gemm: str = "auto"
    warm_prefill: bool = True
    overlap: bool | None = None
    encode_ahead: bool = False
    kv_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.max_running = as_int(self.max_running, "max_running", 1, 1 << 16)
        if self.kv_pages is not None:
            self.kv_pages = as_int(self.kv_pages, "kv_pages", 2, 1 << 40)
        self.token_budget = as_int(self.token_budget, "token_budget", 1, 1 << 30)
        self.kv_memory_fraction = as_float(self.kv_memory_fraction, "kv_memory_fraction", 0.0, 1.0, lo_open=True)
        self.cpu_kv_pages = as_int(self.cpu_kv_pages, "cpu_kv_pages", 2, 1 << 40)
        if self.overlap not in (None, True, False):
            raise ValueError(f"overlap must be None, True or False, got {self.overlap!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if isinstance(self.skinny_gemm, bool):
            self.skinny_gemm = "all" if self.skinny_gemm else "off"
        if self.skinny_gemm not in SKINNY_MODES:
            raise ValueError(f"skinny_gemm must be one of {', '.join(SKINNY_MODES)}, got {self.skinny_gemm!r}")
