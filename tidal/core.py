"""The few types every layer shares: what a sequence feeds (input items), what
it wants back (OutputSpec, StepResult), one step's batch (ForwardBatch), and
the protocol a model implements for the runner. Nothing here imports another
tidal module, so engine, cache, runner, layers and models all build on it
without cycles.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, Union

import torch

if TYPE_CHECKING:
    from tidal.cache.kv_pool import KVPool


# -- host to device ---------------------------------------------------------------
def h2d(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor, without waiting for the device: a plain
    torch.tensor(list, device="cuda") synchronizes the stream; staging through
    pinned memory and copying non-blocking keeps an engine step to its one
    deliberate device-to-host read."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


# -- input items ------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ImageInput:
    """An image's embeddings, one position per row: embeds [n, dim].

    `key` is a content hash of the image, used by the prefix cache.
    extra: model-specific per-position features the model adds later (Qwen3-VL:
        deepstack features [k, n, dim]).
    rope / rope_advance: for models with 3-axis rotary positions (Qwen3-VL), the
        positions' rotary offsets [3, n] from the image's first rotary index, and
        how far the index moves past the image (not n in general).
    """

    embeds: torch.Tensor = field(repr=False)
    key: str
    extra: torch.Tensor | None = field(default=None, repr=False)
    rope: torch.Tensor | None = field(default=None, repr=False)
    rope_advance: int | None = None

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


class Deferred:
    """A payload made on first use, once, from any thread: an image whose
    content key is known from its encoded bytes is decoded only if the prefix
    cache turns out not to hold it by the time its request runs."""

    def __init__(self, make: Callable[[], object]) -> None:
        self._make: Callable[[], object] | None = make
        self._value: object = None
        self._lock = threading.Lock()

    def get(self) -> object:
        with self._lock:
            if self._make is not None:
                self._value, self._make = self._make(), None
            return self._value


@dataclass(frozen=True, eq=False)
class ImageRef:
    """An image not yet encoded: the model's preprocessed `payload` (for
    Moondream 3, its crops) and content key. The engine has the model encode
    it into an ImageInput of `length` positions before the prefill that needs
    it, or skips that when the prefix cache has it."""

    payload: object = field(repr=False)
    key: str
    length: int
    rope: torch.Tensor | None = field(default=None, repr=False)  # as in ImageInput
    rope_advance: int | None = None

    def __len__(self) -> int:
        return self.length

    def ready_payload(self) -> object:
        """The payload, made now if it was deferred."""
        return self.payload.get() if isinstance(self.payload, Deferred) else self.payload


@dataclass(frozen=True)
class CoordInput:
    """A coordinate in [0, 1], fed through the model's coordinate encoder."""

    value: float


@dataclass(frozen=True)
class SizeInput:
    """A (width, height) pair, fed through the model's size encoder."""

    width: float
    height: float


InputItem = Union[int, ImageInput, ImageRef, CoordInput, SizeInput]


def rope_delta(items: "list[InputItem]") -> int:
    """How far the rotary index runs ahead of the position after `items`
    (3-axis rotary models: an image moves the index by rope_advance, not by
    its length; 0 for every other model)."""
    delta = 0
    for item in items:
        if isinstance(item, (ImageInput, ImageRef)) and item.rope_advance is not None:
            delta += item.rope_advance - len(item)
    return delta

# ForwardBatch.feedback_kind values: how a position's embedding is made.
FEED_TOKEN, FEED_COORD, FEED_SIZE = 0, 1, 2


def item_len(item: InputItem) -> int:
    """Positions an item occupies."""
    return len(item) if isinstance(item, (ImageInput, ImageRef)) else 1


def items_len(items: list[InputItem]) -> int:
    return sum(item_len(i) for i in items)


# -- outputs ----------------------------------------------------------------------
@dataclass
class OutputSpec:
    """How to turn a sequence's last hidden state into its next token."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    step: int = 0  # how many tokens this request sampled before; keys the noise
    banned: tuple[int, ...] = ()


@dataclass(frozen=True)
class Guess:
    """What a skill will feed back after its next output unless it finishes
    (Skill.guess_next): that output's sampled token (FEED_TOKEN), its
    coordinate (FEED_COORD), its size (FEED_SIZE), or the token unless the
    model feeds something else for the token sampled (FEED_SAMPLED: a
    Moondream reasoning coordinate token feeds its coordinate), as the model
    reads them off the output (Model.fed_back), and the OutputSpec it will
    then ask for (the same whichever FEED_SAMPLED turns out to feed).
    FINISHES (feed FEED_NOTHING, no spec): that output is certainly the
    skill's last (its length limit), so its request needs no step after it."""

    feed: int
    spec: OutputSpec | None


# Guess.feed values that are never a ForwardBatch feedback kind: the model
# resolves FEED_SAMPLED to one (Model.fed_back); FINISHES feeds nothing.
FEED_SAMPLED = 3
FEED_NOTHING = -1
FINISHES = Guess(FEED_NOTHING, None)


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
    rope_delta: int = 0  # rotary index - position at start_pos (3-axis rotary models; see ImageInput)


@dataclass
class OutputTrace:
    """The raw float32 outputs behind a StepResult (kept only when tracing):
    the head name ("logits", and for Moondream 3 "coord" and "size") -> tensor."""

    heads: dict[str, torch.Tensor]

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self.__dict__["heads"][name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class StepResult:
    """What a skill may need from a sequence's last hidden state this step.

    token: sampled with the OutputSpec. The region fields are Moondream 3's
    (None for models without a region head): argmax of the coordinate logits,
    of the (width, height) size logits, and whether logit(coord) >= logit(eos).
    """

    token: int
    coord_bin: int | None = None
    size_bins: tuple[int, int] | None = None
    coord_over_eos: bool | None = None
    trace: OutputTrace | None = None


# -- one step's batch -------------------------------------------------------------
class ForwardMode(Enum):
    PREFILL = "prefill"  # every sequence feeds more than one position
    DECODE = "decode"  # every sequence feeds exactly one position
    MIXED = "mixed"


@dataclass
class ForwardBatch:
    """One engine step: a ragged batch of sequences, flattened to T positions.

    Position-level device tensors (sequences back to back):
        input_ids: [T] token ids (0 where an embedding replaces the token).
        positions: [T] absolute positions.
        out_cache_loc: [T] KV slots that receive each position's K/V.
        feedback_kind: [T] FEED_TOKEN / FEED_COORD / FEED_SIZE, or None when
            every position is a token (or an image position).
        feedback_values: [T, 2] float32: the coordinate in column 0, or
            (width, height); None with feedback_kind.
    image_spans: (first row, ImageInput) of each image fed this step.
    Sequence-level host lists (length B): q_lens, kv_lens (cached + new after
        this step), bidir_lens (leading positions that attend bidirectionally
        among themselves), req_rows (rows of the request-to-slot table).
    kv_pool, req_to_token: the paged cache.
    attn: the attention backend; layers call attn.forward(q, k, v, layer, batch).
    attn_metadata: what the backend prepared for this step (device tensors).
    """

    mode: ForwardMode
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_cache_loc: torch.Tensor
    q_lens: list[int]
    kv_lens: list[int]
    bidir_lens: list[int]
    req_rows: list[int]
    kv_pool: "KVPool"
    req_to_token: torch.Tensor
    feedback_kind: torch.Tensor | None = None
    feedback_values: torch.Tensor | None = None
    image_spans: list[tuple[int, ImageInput]] = field(default_factory=list)
    rope_positions: torch.Tensor | None = None  # [3, T] rotary indices, for models with rope_axes == 3
    # Images as static buffers (CUDA graphs of extend steps): where image_rows
    # is set, models take image positions' embeddings from image_embeds [T,
    # dim] (and per-model extras, e.g. deepstack features, from image_extra
    # [k, T, dim]) instead of image_spans.
    image_rows: torch.Tensor | None = None  # bool [T]
    image_embeds: torch.Tensor | None = None
    image_extra: torch.Tensor | None = None
    attn: Any = field(default=None, repr=False)
    attn_metadata: Any = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.q_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


# -- what the runner needs from a model -------------------------------------------
@dataclass(frozen=True)
class KVLayout:
    """The shape of one position's cached K/V: per layer, [n_kv_heads, head_dim]."""

    n_layers: int
    n_kv_heads: int
    head_dim: int


class Model(Protocol):
    """A model behind the runner. Moondream 3 is one implementation.

    forward: hidden states [T, dim] for every position of the batch; the
        model embeds the batch's items itself (`embed`: tokens, images,
        feedback) and its attention reads and writes the paged cache through
        `batch.attn`.
    heads: for the hidden states [N, dim] of positions that want an output ->
        (float32 logits [N, vocab], int64 extras [N, k] or None, raw heads for
        tracing). extras_to_result turns one row of extras into StepResult fields.
    encode_image: an ImageRef's payload -> embeddings [length, dim].
    use_kernels: fused Triton kernels on or off.
    cuda_graphs_ok (optional attribute, default True): False for a model whose
        step syncs on the device, so the engine captures no graphs for it.
    encode_images (optional): several payloads through one vision-encoder run.
    capture_graphs (optional): capture the model's own fixed-shape parts (a
        vision encoder) as CUDA graphs; the engine calls it with its decode graphs.
    fed_back / fed_back_on_device (optional, models whose skills feed back
        coordinates or sizes): the item a skill feeds back after an output
        for a Guess.feed kind (host), and the same kinds and values read off
        packed outputs on the device, equal to the last bit (a step queued
        ahead feeds them).
    """

    device: torch.device
    dtype: torch.dtype
    kv_layout: KVLayout
    max_context: int
    vocab_size: int

    def embed(self, batch: ForwardBatch) -> torch.Tensor: ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor: ...

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]: ...

    def extras_to_result(self, extras: list[int]) -> dict[str, Any]: ...

    def encode_image(self, payload: object) -> torch.Tensor: ...

    def use_kernels(self, enabled: bool) -> None:
        """Turn the model's fused Triton kernels on or off (the engine decides)."""
