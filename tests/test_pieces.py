"""The model's pieces on small hand-checked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tidal.layers.moe import moe_forward, route
from tidal.layers.rotary import PartialRotary
from tidal.models.moondream3.config import MoondreamConfig, VisionConfig
from tidal.models.moondream3.processor import overlap_crops, select_tiling, stitch_crops
from tidal.models.moondream3.region import fourier_features, size_from_bins
from tidal.models.moondream3.text import tau_scales


# -- tiling -------------------------------------------------------------------
@pytest.mark.parametrize(
    "h, w, want",
    [
        (100, 100, (1, 1)),  # smaller than one window
        (266, 5000, (1, 1)),  # one side fits in a window
        (800, 800, (3, 3)),  # minimum 4x4 exceeds 12: scaled down by sqrt(12/16)
        (532, 1064, (2, 4)),  # aspect-ratio tiles, within the minimum
        (300, 3000, (1, 8)),  # minimum 2x12 exceeds 12: scaled by sqrt(1/2)
        (280, 1200, (2, 6)),  # 2x7 exceeds 12: the wider side shrinks to 12 // 2
    ],
)
def test_select_tiling(h, w, want):
    assert select_tiling(h, w, 266, 12) == want


def test_overlap_crops_layout():
    cfg = VisionConfig()
    rgb = np.zeros((600, 1000, 3), dtype=np.uint8)
    rgb[:, 500:] = 255  # right half white
    crops = overlap_crops(Image.fromarray(rgb), cfg)
    assert crops.tiling == select_tiling(600 - 112, 1000 - 112, 266, 12) == (2, 4)
    assert crops.pixels.shape == (9, 378, 378, 3)
    # the resized image is 4 * 266 + 112 = 1176 wide; the last column crop starts at 3 * 266 = 798
    assert crops.pixels[4, :, -1].min() == 255 and crops.pixels[1, :, 0].max() == 0
    assert crops.pixels[0, :, 0].max() == 0 and crops.pixels[0, :, -1].min() == 255  # global crop


def test_stitch_crops_keeps_each_overlap_once():
    g, m = 5, 1
    # feature value encodes (crop, row, col) so every output cell names its source
    local = torch.tensor([[[[100 * c + 10 * y + x] for x in range(g)] for y in range(g)] for c in range(4)], dtype=torch.float32)
    out = stitch_crops(local, (2, 2), m)[..., 0]
    assert out.shape == (2 * (g - 2 * m) + 2 * m, 2 * (g - 2 * m) + 2 * m) == (8, 8)
    assert out[0, 0] == 0  # crop 0 keeps its outer margins
    assert out[0, 3] == 3  # crop 0 keeps col 3 (its inner margin col 4 is dropped)
    assert out[0, 4] == 100 + 1  # crop 1 starts at its col 1 (col 0 is the overlap)
    assert out[0, 7] == 100 + 4  # and keeps its outer right margin
    assert out[3, 0] == 30  # crop 0 row 3
    assert out[4, 0] == 200 + 10  # crop 2 (second tile row) from its row 1
    assert out[7, 7] == 300 + 44


# -- rotary and tau ----------------------------------------------------------------
def test_rotary_rotates_the_first_dims_only():
    rot = PartialRotary(rotary_dim=4, max_positions=8, theta=100.0, device="cpu")
    x = torch.zeros(2, 1, 6)
    x[:, 0, 0] = 1.0  # real part of frequency 0 (inv freq 1)
    x[:, 0, 1] = 1.0  # real part of frequency 1 (inv freq 100 ** -0.5 = 0.1)
    x[:, 0, 5] = 7.0  # not rotated
    y = rot(x, torch.tensor([0, 3]))
    assert torch.allclose(y[0], x[0])  # position 0 is the identity
    assert y[1, 0, 0].item() == pytest.approx(math.cos(3.0)) and y[1, 0, 2].item() == pytest.approx(math.sin(3.0))
    assert y[1, 0, 1].item() == pytest.approx(math.cos(0.3), rel=1e-5) and y[1, 0, 3].item() == pytest.approx(math.sin(0.3), rel=1e-5)
    assert y[1, 0, 5] == 7.0 and y[1, 0, 4] == 0.0


def test_rotary_dot_products_depend_on_distance_only():
    rot = PartialRotary(rotary_dim=32, max_positions=64, theta=1.5e6, device="cpu")
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 64, generator=gen), torch.randn(1, 1, 64, generator=gen)
    scale = float(q.norm() * k.norm())  # tolerances against the vectors' size: a dot product near 0 has no relative precision
    def dot(pq, pk):
        return (rot(q, torch.tensor([pq])) * rot(k, torch.tensor([pk]))).sum().item()
    assert dot(10, 7) == pytest.approx(dot(40, 37), abs=1e-5 * scale)
    assert abs(dot(10, 7) - dot(10, 9)) > 1e-3 * scale


def test_tau_scales():
    qkv = torch.zeros(3, 6)  # gelu(0) = 0 -> the token term is tanh(0) = 0
    wq, wv = torch.randn(2, 6), torch.randn(2, 6)
    alpha = torch.tensor([0.0, 50.0])
    pos = torch.tensor([0, int(round(math.e - 1)), 100])
    tq, tv = tau_scales(qkv, pos, wq, wv, alpha)
    assert torch.equal(tq, tv)
    assert tq[0].tolist() == [1.0, 1.0]  # log(1) = 0 -> sigmoid(0) - 0.5 = 0
    assert tq[2, 0].item() == pytest.approx(1.0)  # alpha 0: no position term
    assert tq[2, 1].item() == pytest.approx(1.5, abs=1e-6)  # sigmoid(50 * log 101) -> 1
    qkv = torch.ones(1, 6)
    tq, _ = tau_scales(qkv, torch.tensor([0]), torch.full((2, 6), 0.1), wv, alpha)
    g1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # exact gelu(1)
    assert tq[0, 0].item() == pytest.approx(math.tanh(6 * 0.1 * g1) + 1.0, rel=1e-6)


# -- MoE -------------------------------------------------------------------------
def _moe_by_hand(x, rw, rb, fc1, fc2, k):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = rw @ x[t] + rb
        top = torch.topk(logits, k)
        w = torch.softmax(top.values, dim=0)
        for weight, e in zip(w, top.indices):
            h = fc1[e] @ x[t]
            a, g = h.chunk(2)
            out[t] += weight * (fc2[e] @ (torch.nn.functional.gelu(a) * (g + 1)))
    return out


def test_route_picks_top_k_and_softmaxes_over_them():
    x = torch.tensor([[1.0, 0.0]])
    rw = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    weights, ids = route(x, rw, None, 2)
    assert ids.tolist() == [[0, 2]]
    e = math.exp(1.0)
    assert weights[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)])


@pytest.mark.parametrize("n_tokens", [1, 3, 20])  # gather path, then the per-expert loop
def test_moe_matches_hand_computation(n_tokens):
    torch.manual_seed(n_tokens)
    e, d, inner, k = 6, 8, 5, 2
    x = torch.randn(n_tokens, d, dtype=torch.float64)
    rw, rb = torch.randn(e, d, dtype=torch.float64), torch.randn(e, dtype=torch.float64)
    fc1, fc2 = torch.randn(e, 2 * inner, d, dtype=torch.float64), torch.randn(e, d, inner, dtype=torch.float64)
    got = moe_forward(x, rw, rb, fc1, fc2, k)
    # routing weights are softmaxed in float32, as in the reference
    assert torch.allclose(got, _moe_by_hand(x, rw, rb, fc1, fc2, k), rtol=1e-6, atol=1e-6)


# -- region --------------------------------------------------------------------------
def test_fourier_features():
    f = fourier_features(torch.tensor([[0.25]]), torch.tensor([[1.0, 2.0]]))
    assert f[0].tolist() == pytest.approx([0.0, -1.0, 1.0, 0.0], abs=1e-6)  # cos(pi/2), cos(pi), sin(pi/2), sin(pi)


def test_size_bins():
    assert size_from_bins(torch.tensor([0, 1023])).tolist() == [2.0**-10, 1.0]
    assert size_from_bins(torch.tensor([1023 * 9 // 10])).item() == pytest.approx(2 ** (920 / 1023 * 10 - 10), rel=1e-6)


def test_config_overrides_and_defaults():
    cfg = MoondreamConfig.from_dict({"text": {"dim": 128, "n_heads": 2, "moe": {"num_experts": 16}}, "vision": {"enc_dim": 64}})
    assert cfg.text.dim == 128 and cfg.text.head_dim == 64 and cfg.text.rotary_dim == 32
    assert cfg.text.moe.num_experts == 16 and cfg.text.moe.experts_per_token == 8  # untouched default
    assert cfg.vision.enc_dim == 64 and cfg.vision.grid == 27 and cfg.vision.n_image_tokens == 729
    assert cfg.tokenizer.templates["query"] == {"prefix": [1, 15381, 2], "suffix": [3]}
    real = MoondreamConfig()
    assert (real.text.dim, real.text.n_layers, real.text.rotary_dim, real.text.rope_theta) == (2048, 24, 32, 1.5e6)
    assert MoondreamConfig.from_dict({"text": {"moe": None}}).text.is_moe_layer(10) is False


def test_slot_table_writes_apply_together_in_order():
    """The scheduler's writes to the request-to-slot table wait for one flush;
    an entry written twice keeps the later value, as if written one by one."""
    from tidal.cache.kv_pool import ReqToTokenPool

    pool = ReqToTokenPool(4, 16, "cpu")
    want = torch.zeros_like(pool.table)
    writes = [(0, 0, [5, 6, 7]), (2, 3, [9]), (0, 2, [11, 12]), (3, 0, []), (2, 3, [13, 14])]
    for row, start, slots in writes:
        pool.write(row, start, slots)
        want[row, start : start + len(slots)] = torch.tensor(slots, dtype=torch.int64)
    assert torch.equal(pool.table, torch.zeros_like(pool.table))  # nothing before the flush
    pool.flush()
    assert torch.equal(pool.table, want)
    pool.flush()  # nothing pending: no change
    assert torch.equal(pool.table, want)
    # a decode step's writes (one slot a row, rows distinct), and one row written twice without overlap
    for writes in ([(r, 15, [100 + r]) for r in range(4)], [(1, 4, [21, 22]), (1, 6, [23])]):
        for row, start, slots in writes:
            pool.write(row, start, slots)
            want[row, start : start + len(slots)] = torch.tensor(slots, dtype=torch.int64)
        pool.flush()
        assert torch.equal(pool.table, want)
    with pytest.raises(IndexError):  # past the row's end: refused, not written into the next row
        pool.write(0, 15, [1, 2])


def test_image_keys_follow_the_pixels():
    """Equal pixels, equal keys (however the image arrived); a changed pixel
    in the last chunk or another shape of the same bytes, another key."""
    from tidal.images import image_key, pixels_key

    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (700, 900, 3), dtype=np.uint8)  # several hash chunks
    key = pixels_key(big)
    assert image_key(Image.fromarray(big)) == key == pixels_key(big.copy())
    changed = big.copy()
    changed[-1, -1, -1] ^= 1
    assert pixels_key(changed) != key
    assert pixels_key(big.reshape(900, 700, 3)) != key


def test_array_images_skip_pil_and_give_the_same_pixels():
    """An RGB uint8 array is copied as it is (no PIL round trip); its pixels
    equal what the PIL path gives, the caller may change its array afterwards,
    other layouts still go through PIL, and the size limit still holds."""
    from tidal.images import ImageError, decoded_pixels

    rng = np.random.default_rng(3)
    arr = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    with decoded_pixels(arr) as fast, decoded_pixels(Image.fromarray(arr)) as via_pil:
        assert fast.dtype == np.uint8 and fast.shape == (37, 53, 3) and fast.flags.c_contiguous
        assert np.array_equal(fast, via_pil)
    arr[0, 0, 0] ^= 1
    assert fast[0, 0, 0] != arr[0, 0, 0]  # a copy, not a view of the caller's array
    view = arr[:, ::2]  # not contiguous
    with decoded_pixels(view) as got:
        assert np.array_equal(got, np.asarray(Image.fromarray(np.ascontiguousarray(view))))
    rgba = rng.integers(0, 255, (5, 6, 4), dtype=np.uint8)
    with decoded_pixels(rgba) as got:
        assert got.shape == (5, 6, 3) and np.array_equal(got, np.asarray(Image.fromarray(rgba).convert("RGB")))
    with pytest.raises(ImageError, match="limit"):
        with decoded_pixels(arr, max_pixels=100):
            pass


def test_projections_are_torchs_linear_unless_the_skinny_kernel_may_run():
    """tidal.layers.linear.linear is F.linear bit for bit while the switch is
    off, and on the CPU whatever the switch says (the kernel is CUDA-only)."""
    from tidal.layers import linear as lin

    gen = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(3, 40, generator=gen), torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    want = torch.nn.functional.linear(x, w, b)
    before = lin.skinny_mode()
    try:
        for mode in lin.SKINNY_MODES:
            lin.use_skinny(mode)
            assert torch.equal(lin.linear(x, w, b), want)
            assert torch.equal(lin.linear(x, w), torch.nn.functional.linear(x, w))
        with pytest.raises(ValueError, match="skinny_gemm"):
            lin.use_skinny("sometimes")
    finally:
        lin.use_skinny(before)


def test_skinny_gemm_setting_reads_bools_and_refuses_other_values():
    from tidal.engine.engine import EngineConfig

    assert EngineConfig().skinny_gemm == "auto"
    assert EngineConfig(skinny_gemm=True).skinny_gemm == "all" and EngineConfig(skinny_gemm=False).skinny_gemm == "off"
    with pytest.raises(ValueError, match="skinny_gemm"):
        EngineConfig(skinny_gemm="fast")


def test_kv_dtype_setting_refuses_what_the_cache_cannot_store():
    from tidal.engine.engine import EngineConfig

    assert EngineConfig().kv_dtype == "auto" and EngineConfig(kv_dtype="fp8").kv_dtype == "fp8"
    with pytest.raises(ValueError, match="kv_dtype must be one of auto, fp8"):
        EngineConfig(kv_dtype="float8")


def test_skinny_auto_takes_the_shapes_measured_faster():
    """The auto rule: routers and products with both sides >= 4096 (where the
    H100 measured the kernel ahead), not Moondream's or Qwen3-30B's K = 2048
    projections (cuBLAS level or ahead)."""
    from tidal.kernels.skinny_gemm import prefers_skinny

    assert prefers_skinny(64, 2048) and prefers_skinny(128, 2048)  # routers
    assert prefers_skinny(6144, 4096) and prefers_skinny(24576, 4096) and prefers_skinny(4096, 12288)  # Qwen3-VL-8B
    assert prefers_skinny(51200, 2048) and prefers_skinny(151936, 2048)  # lm_heads
    assert not prefers_skinny(6144, 2048) and not prefers_skinny(2048, 8192) and not prefers_skinny(5120, 2048)


def test_skinny_tiles_fit_shared_memory_in_either_dtype():
    from tidal.kernels.skinny_gemm import MAX_ROWS, skinny_config

    for shared in (227 << 10, 99 << 10):  # H100; a consumer card
        for n, k in ((64, 2048), (6144, 4096), (51200, 2048), (151936, 4096), (4096, 12288)):
            for itemsize in (2, 4):
                block_n, block_k, _, stages = skinny_config(n, k, itemsize=itemsize, shared_bytes=shared)
                assert (block_n + MAX_ROWS) * block_k * itemsize * (stages - 1) <= shared - 4096 and stages >= 2 and block_k >= 16
    assert skinny_config(151936, 4096) == (128, 256, 4, 4)  # the bf16 launch measured on the H100 stays


def test_linear_gelu_tanh_is_the_tanh_gelu_of_the_product_on_any_device_path():
    """Off CUDA the epilogue request falls back to F.gelu(tanh) of the product,
    bit for bit (torch's CPU _addmm_activation would give the erf GELU)."""
    from tidal.layers.linear import linear_gelu_tanh

    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 5, 16, generator=gen), torch.randn(24, 16, generator=gen), torch.randn(24, generator=gen)
    want = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh")
    for epilogue in (False, True):
        got = linear_gelu_tanh(x, w, b, epilogue)
        assert got.shape == (2, 5, 24) and torch.equal(got, want)
    erf = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))
    assert not torch.allclose(want, erf, rtol=0, atol=1e-5)  # the two forms are told apart at this size
