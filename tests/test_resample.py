"""Image preprocessing on the device: Pillow's resize and Moondream's crops, pixel for pixel.

Pillow is the oracle (it made the reference's crops); every comparison is exact.
The same checks run on CUDA when there is one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tidal.models.moondream3.config import VisionConfig
from tidal.models.moondream3.processor import (
    crops_to_tensor,
    normalize_crops,
    overlap_crops,
    overlap_crops_tensor,
)
from tidal.resample import resize_like_pillow

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """Noise over a smooth gradient: both the extremes (clipping) and ordinary content."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1.0, h)[:, None, None]
    return np.clip(ramp + rng.normal(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("filter", sorted(PIL_FILTERS))
def test_resize_equals_pillow(device, filter):
    rng = np.random.default_rng(1)
    # fixed shapes that take each pass order (vertical first when the height
    # shrinks by more than twice what the width does), 1-pixel edges, upscales, then random ones
    shapes = [((400, 300), (100, 250)), ((300, 400), (250, 100)), ((7, 9), (1, 30)), ((1, 1), (5, 3)), ((50, 60), (60, 50))]
    shapes += [(tuple(rng.integers(1, 400, 2)), tuple(rng.integers(1, 400, 2))) for _ in range(12)]
    for i, ((h, w), (oh, ow)) in enumerate(shapes):
        src = _image(int(h), int(w), i)
        want = np.asarray(Image.fromarray(src).resize((int(ow), int(oh)), PIL_FILTERS[filter]))
        got = resize_like_pillow(torch.from_numpy(src).to(device), (int(ow), int(oh)), filter).cpu().numpy()
        assert got.shape == want.shape and got.dtype == np.uint8
        assert np.array_equal(got, want), ((h, w), (oh, ow), int(np.abs(got.astype(int) - want).max()))


def test_resize_refuses_other_than_uint8_hwc():
    with pytest.raises(ValueError, match="uint8"):
        resize_like_pillow(torch.zeros(4, 4, 3), (2, 2))
    with pytest.raises(ValueError, match="uint8"):
        resize_like_pillow(torch.zeros(4, 4, dtype=torch.uint8), (2, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hw", [(378, 378), (200, 150), (600, 1000), (1200, 300), (1080, 1920)], ids=str)
def test_crops_on_device_equal_pillow_crops(device, hw):
    cfg = VisionConfig()
    src = _image(*hw, seed=hw[0])
    want = overlap_crops(Image.fromarray(src), cfg)
    got, tiling = overlap_crops_tensor(torch.from_numpy(src).to(device), cfg)
    assert tiling == want.tiling
    assert np.array_equal(got.cpu().numpy(), want.pixels)
    # and normalized as the CPU path normalizes them, bit for bit
    for dtype in (torch.float32, torch.bfloat16):
        ref = crops_to_tensor(want, "cpu", dtype)
        assert torch.equal(normalize_crops(got, dtype).cpu(), ref)


def test_model_encodes_pixels_as_it_encodes_their_crops(tiny_md):
    """The payload the API now hands the engine (raw pixels, cropped when encoded)
    gives the embeddings of the crops made up front."""
    src = _image(500, 700, 3)
    model = tiny_md.model
    from_pixels = model.encode_image(src)
    from_crops = model.encode_image(overlap_crops(Image.fromarray(src), model.config.vision))
    assert torch.equal(from_pixels, from_crops)
