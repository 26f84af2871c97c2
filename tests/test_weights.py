"""Checkpoint loading: the official layout, sharding, strictness and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN, assert_matches_golden, golden_cases, run_case
from safetensors.torch import load_file, save_file

from tidal import CheckpointError, Moondream
from tidal.models.checkpoint import resolve_checkpoint
from tidal.models.moondream3.tokenizer import load_tokenizer
from tidal.models.moondream3.weights import load_model

CASE = next(c for c in golden_cases("point") if c["image"] == "tall")


def _copy_checkpoint(tmp_path: Path, tensors: dict[str, torch.Tensor] | None = None, config: dict | None = None) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(GOLDEN / "tokenizer.json", folder)
    cfg = json.loads((GOLDEN / "config.json").read_text())
    if config:
        cfg["config"]["text"].update(config)
    (folder / "config.json").write_text(json.dumps(cfg))
    if tensors is None:
        shutil.copy(GOLDEN / "model.safetensors", folder)
    else:
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def golden_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "model.safetensors"))


def test_missing_weight_is_named(tmp_path, golden_tensors):
    tensors = dict(golden_tensors)
    del tensors["model.text.blocks.1.mlp.router.weight"]
    with pytest.raises(CheckpointError, match=r"missing weights \(1\): model.text.blocks.1.mlp.router.weight"):
        load_model(_copy_checkpoint(tmp_path, tensors), "cpu", torch.float32)


def test_extra_weight_is_named(tmp_path, golden_tensors):
    tensors = dict(golden_tensors, **{"model.text.blocks.0.attn.extra": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected weights \(1\): model.text.blocks.0.attn.extra"):
        load_model(_copy_checkpoint(tmp_path, tensors), "cpu", torch.float32)


def test_shape_mismatch_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"shape mismatches .*model.text.blocks.0.mlp.fc1.weight: checkpoint \(256, 128\), model \(512, 128\)"):
        load_model(_copy_checkpoint(tmp_path, config={"ff_dim": 512}), "cpu", torch.float32)


def test_sharded_checkpoint_loads_the_same_model(tmp_path, golden_tensors):
    folder = _copy_checkpoint(tmp_path)
    (folder / "model.safetensors").unlink()
    keys = sorted(golden_tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for fname, part in shards.items():
        save_file({k: golden_tensors[k] for k in part}, str(folder / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    md = Moondream.from_pretrained(folder, device="cpu", dtype="float32")
    try:
        assert_matches_golden(run_case(md, CASE, GOLDEN / "images" / "tall.png"), CASE)
    finally:
        md.close()
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shards that are not in"):
        load_model(folder, "cpu", torch.float32)


def test_region_layernorm_is_used_when_present(tmp_path, golden_tensors):
    ln = {"model.region.ln.weight": torch.rand(128).to(torch.bfloat16) + 0.5, "model.region.ln.bias": torch.randn(128).to(torch.bfloat16)}
    model = load_model(_copy_checkpoint(tmp_path, dict(golden_tensors, **ln)), "cpu", torch.float32)
    assert model.region.ln is not None
    h = torch.randn(3, 128)
    normed = torch.nn.functional.layer_norm(h, (128,), ln["model.region.ln.weight"].float(), ln["model.region.ln.bias"].float())
    assert torch.allclose(model.region.decode_coordinate(h), model.region.coord_decoder(normed), atol=1e-5)
    plain = load_model(GOLDEN, "cpu", torch.float32)
    assert plain.region.ln is None
    assert torch.allclose(plain.region.decode_coordinate(h), plain.region.coord_decoder(h))


def test_checkpoint_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(empty, "cpu", torch.float32)
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has neither model.safetensors nor"):
        load_model(empty, "cpu", torch.float32)
    with pytest.raises(CheckpointError, match="is not a Hugging Face repo id"):
        resolve_checkpoint(tmp_path / "does" / "not" / "exist")


def _offline(monkeypatch) -> None:
    """The Hub offline for this test: the variable, and huggingface_hub's
    constant (read when it was first imported: another test may have done
    that, and a download then tries the network until it times out)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_offline_repo_id_says_what_to_do(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(CheckpointError, match="download the repo elsewhere"):
        resolve_checkpoint("moondream/moondream3-preview-not-cached")


def test_tokenizer_sources(tmp_path, monkeypatch):
    explicit = load_tokenizer(None, GOLDEN / "tokenizer.json")
    assert explicit.encode("what color").ids == [23, 29]
    assert load_tokenizer(GOLDEN).encode("dog").ids == [37]
    _offline(monkeypatch)
    with pytest.raises(CheckpointError, match=r"moondream/starmie-v1.*put it at .*tokenizer.json"):
        load_tokenizer(tmp_path)
