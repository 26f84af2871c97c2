"""Qwen3-VL's image processor against transformers' (its Pillow backend): the
same pixel values, bit for bit, and the same grids, on the CPU and on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tidal.errors import ImageError
from tidal.models.qwen3_vl.processor import (
    ImageProcessorConfig,
    process_image,
    smart_resize,
)

transformers = pytest.importorskip("transformers")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CONFIGS = {
    # Qwen3-VL's preprocessor_config.json
    "qwen3-vl": dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"shortest_edge": 65536, "longest_edge": 16777216}),
    # Qwen2-VL's: patch 14, CLIP mean/std, a small pixel budget (downscales) and bilinear
    "small-budget": dict(patch_size=14, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 3136, "longest_edge": 200704}, resample=2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pixel_values_and_grids_equal_transformers(device, name):
    ref = transformers.Qwen2VLImageProcessorPil(**CONFIGS[name])
    cfg = ImageProcessorConfig.from_dict(ref.to_dict())
    rng = np.random.default_rng(len(name))
    for h, w in [(300, 400), (720, 1280), (100, 37), (64, 64), (1080, 1920), (31, 500)]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = ref(images=[Image.fromarray(arr)], return_tensors="np")
        got, grid = process_image(torch.from_numpy(arr).to(device), cfg)
        assert grid == tuple(want["image_grid_thw"][0].tolist())
        assert got.dtype == torch.float32 and np.array_equal(got.cpu().numpy(), want["pixel_values"]), (h, w)


def test_smart_resize_keeps_multiples_and_the_pixel_budget():
    for h, w in [(1, 150), (999, 1001), (4000, 3000), (28, 28), (57, 5000)]:
        rh, rw = smart_resize(h, w, 28, 3136, 200704)
        assert rh % 28 == 0 and rw % 28 == 0 and 3136 <= rh * rw <= 200704
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(10, 2500, 28, 3136, 200704)
