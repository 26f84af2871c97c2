"""Qwen3-VL's vision tower against transformers' Qwen3VLVisionModel (float32,
CPU): merged tokens and every deepstack feature within 1e-5, for images of
different sizes in one call and a two-frame (video) grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tidal.models.qwen3_vl.processor import ImageProcessorConfig, process_image
from tidal.models.qwen3_vl.vision import VisionConfig, VisionModel

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    hcfg = transformers.Qwen3VLVisionConfig(depth=3, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=8, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=48, num_position_embeddings=16, deepstack_visual_indexes=[0, 2])
    hf = transformers.Qwen3VLVisionModel(hcfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    ours = VisionModel(VisionConfig.from_hf(hcfg.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # the checkpoint's names
    return hf, ours


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _compare(hf, ours, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> None:
    with torch.no_grad():
        want = hf(patches, grid_thw=torch.tensor(grids))
        got, deep = ours(patches, grids)
    assert got.shape == want.pooler_output.shape and _rel(got, want.pooler_output) <= 1e-5
    assert len(deep) == len(want.deepstack_features) == 2
    for a, b in zip(deep, want.deepstack_features):
        assert _rel(a, b) <= 1e-5


def test_images_of_different_sizes_in_one_call(towers):
    hf, ours = towers
    cfg = ImageProcessorConfig(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=256, max_pixels=200_000)
    rng = np.random.default_rng(0)
    parts = [process_image(torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), cfg) for h, w in [(60, 90), (33, 47), (16, 16)]]
    _compare(hf, ours, torch.cat([p for p, _ in parts]), [g for _, g in parts])


def test_a_two_frame_grid(towers):
    """Video: t = 2 temporal patches share the grid's positions; each attends within itself."""
    hf, ours = towers
    grids = [(2, 4, 6), (1, 2, 2)]
    patches = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 8 * 8, generator=torch.Generator().manual_seed(1))
    _compare(hf, ours, patches, grids)


def test_runs_of_equal_images_attend_each_within_itself(towers, monkeypatch):
    """Same-size images (and a video's frames) take one batched attention
    call a run: still each image attends only within itself, as transformers
    does image by image."""
    from tidal.models.qwen3_vl import vision

    hf, ours = towers
    runs = []
    real = vision._runs
    monkeypatch.setattr(vision, "_runs", lambda lengths: runs.append(real(lengths)) or runs[-1])
    grids = [(1, 4, 6), (1, 4, 6), (2, 4, 6), (1, 2, 2), (1, 4, 6)]
    patches = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 8 * 8, generator=torch.Generator().manual_seed(2))
    _compare(hf, ours, patches, grids)
    assert runs[0] == [(24, 4), (4, 1), (24, 1)]


def test_grid_tables_are_cached_and_follow_new_weights(towers):
    """A grid's resampled position embeddings and rotary tables are made once
    (the same tensors come back), and writing new position weights in place
    (as loading does) gives tables of the new weights: transformers' output
    again after both towers' tables changed."""
    import copy

    hf, ours = copy.deepcopy(towers)
    first = ours._grid_tables(4, 6)
    assert all(a is b for a, b in zip(first, ours._grid_tables(4, 6)))
    with torch.no_grad():
        bump = torch.randn_like(ours.pos_embed.weight)
        ours.pos_embed.weight.add_(bump)
        hf.pos_embed.weight.add_(bump)
    assert not torch.equal(ours._grid_tables(4, 6)[0], first[0])
    grids = [(1, 4, 6)]
    patches = torch.randn(24, 3 * 2 * 8 * 8, generator=torch.Generator().manual_seed(2))
    _compare(hf, ours, patches, grids)


def test_fused_residual_norms_give_the_same_tower(towers, monkeypatch):
    """The fast path's blocks (each residual add with the LayerNorm after it in
    one kernel, on CUDA; forced here) still match transformers, deepstack
    features included, and the fused kernel ran once per residual add."""
    pytest.importorskip("triton")
    from tidal.kernels import residual_norm as rn

    hf, ours = towers
    calls = []
    fused = rn.residual_norm
    monkeypatch.setattr(rn, "residual_norm", lambda *a: calls.append(1) or fused(*a))
    ours.fused_norms = True
    try:
        grids = [(1, 6, 8), (1, 4, 4)]
        patches = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 8 * 8, generator=torch.Generator().manual_seed(2))
        _compare(hf, ours, patches, grids)
    finally:
        ours.fused_norms = False
    assert len(calls) == 2 * len(ours.blocks)
