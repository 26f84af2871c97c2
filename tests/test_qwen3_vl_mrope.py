"""Qwen3-VL's M-RoPE indices and angles against transformers'."""

from __future__ import annotations

import pytest
import torch

from tidal.models.qwen3_vl.mrope import image_advance, mrope_angles, rope_positions

transformers = pytest.importorskip("transformers")

IMAGE, VIDEO = 7, 8  # token ids standing for image / video positions here


def _tiny_model():
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=1, intermediate_size=16, out_hidden_size=32, patch_size=8, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
    )
    return transformers.Qwen3VLModel(cfg).eval(), cfg


def test_rope_indices_equal_transformers():
    model, cfg = _tiny_model()
    merge = cfg.vision_config.spatial_merge_size
    grids = [(1, 4, 6), (1, 8, 2), (1, 2, 2)]
    segments = [5, (6, grids[0]), 3, (4, grids[1]), 1, (1, grids[2]), 2]  # images sit between vision start and end tokens
    ids, types = [], []
    for seg in segments:
        if isinstance(seg, int):
            ids += [1] * seg
            types += [0] * seg
        else:
            ids += [IMAGE] * seg[0]
            types += [1] * seg[0]
    want, delta = model.get_rope_index(torch.tensor([ids]), torch.tensor([types]), image_grid_thw=torch.tensor(grids))
    got = rope_positions(segments, merge)
    assert torch.equal(got, want[:, 0])
    # the delta text after the last image carries: rotary index - sequence index
    assert int(delta) == int(got.max()) + 1 - len(ids)
    assert image_advance(grids[1], merge) == 4


def test_rope_angles_equal_transformers():
    model, cfg = _tiny_model()
    rotary = model.language_model.rotary_emb
    positions = rope_positions([3, (6, (1, 4, 6)), 2], cfg.vision_config.spatial_merge_size)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions[:, None, :])
    angles = mrope_angles(positions, rotary.inv_freq, rotary.mrope_section)
    assert torch.allclose(torch.cat([angles.cos(), angles.cos()], -1), cos[0], atol=0, rtol=0)
    assert torch.allclose(torch.cat([angles.sin(), angles.sin()], -1), sin[0], atol=0, rtol=0)
