"""The embedded tiny checkpoint and `tidal demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors import safe_open

from tidal.demo import run_demo, sample_image_path
from tidal.models.moondream3.config import MoondreamConfig
from tidal.models.moondream3.tiny import (
    TINY_NAME,
    TINY_OVERRIDES,
    ensure_tiny_checkpoint,
    random_state_dict,
)


def test_tiny_checkpoint_is_in_the_official_layout(tmp_path):
    folder = ensure_tiny_checkpoint(tmp_path)
    assert folder.name == TINY_NAME
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["config"] == TINY_OVERRIDES and cfg["architectures"] == ["HfMoondream"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("model.") for k in keys)
        assert f.get_tensor("model.text.wte").dtype == torch.bfloat16
        assert f.get_tensor("model.text.blocks.2.mlp.fc1.weight").shape == (8, 128, 128)  # experts x 2*inner x dim
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tmp_path) == folder  # cached: not rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_tiny_weights_are_deterministic():
    cfg = MoondreamConfig.from_dict(TINY_OVERRIDES)
    a, b = random_state_dict(cfg, seed=0), random_state_dict(cfg, seed=0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.text.wte"], random_state_dict(cfg, seed=1)["model.text.wte"])
    assert torch.all(a["model.text.post_ln.weight"] == 1) and torch.all(a["model.text.lm_head.bias"] == 0)


def test_demo_runs_every_skill(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDAL_CACHE", str(tmp_path))
    lines: list[str] = []
    results = run_demo(max_tokens=8, out=lines.append)
    assert set(results) == {
        "caption short", "caption normal (streamed)", "query", "query + reasoning", "query + spatial ref",
        "query, text only", "detect 'car'", "point 'tree'", "caption from file path",
    }
    assert isinstance(results["caption short"]["caption"], str)
    assert results["caption short"] == results["caption from file path"]  # greedy, same image
    assert set(results["query + reasoning"]) == {"reasoning", "answer"}
    for box in results["detect 'car'"]["objects"]:
        assert set(box) == {"x_min", "y_min", "x_max", "y_max"} and box["x_min"] <= box["x_max"]
    for p in results["point 'tree'"]["points"]:
        assert 0 <= p["x"] <= 1 and 0 <= p["y"] <= 1
    assert (tmp_path / TINY_NAME / "model.safetensors").is_file()
    assert any(line.startswith("detect 'car'") and " ms " in line for line in lines)


def test_cli_demo(tmp_path):
    env = dict(os.environ, TIDAL_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "tidal", "demo", "--max-tokens", "4", "--image", str(sample_image_path())], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("encode_image", "caption short", "query + reasoning", "detect 'car'", "point 'tree'"):
        assert name in out.stdout
