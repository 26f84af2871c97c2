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


def test_demo_runs_every_skill(tmp_path, monkeypatch, tiny_md):
    monkeypatch.setenv("TIDAL_CACHE", str(tmp_path))
    lines: list[str] = []
    results = run_demo(max_tokens=8, out=lines.append)
    assert (tmp_path / TINY_NAME / "model.safetensors").is_file()
    # The demo's answers are the Python API's on the same (deterministic) tiny model.
    img = sample_image_path()
    text = {"max_tokens": 8, "temperature": 0.0}
    want = {
        "caption short": tiny_md.caption(img, "short", settings=text),
        "caption normal (streamed)": tiny_md.caption(img, "normal", settings=text),
        "query": tiny_md.query(img, "What is in this image?", settings=text),
        "query + reasoning": tiny_md.query(img, "How many cars are there?", reasoning=True, settings=text),
        "query + spatial ref": tiny_md.query(img, "What is this?", spatial_refs=[[0.6, 0.65, 0.84, 0.87]], settings=text),
        "query, text only": tiny_md.query(None, "Write one sentence about the sea.", settings=text),
        "detect 'car'": tiny_md.detect(img, "car", settings={"max_objects": 10}),
        "point 'tree'": tiny_md.point(img, "tree", settings={"max_objects": 10}),
        "caption from file path": tiny_md.caption(img, "short", settings=text),
    }
    assert json.loads(json.dumps(results)) == json.loads(json.dumps(want))
    assert results["caption short"]["caption"] and results["detect 'car'"]["objects"]
    for name in want:
        line = next(line for line in lines if line.startswith(name))
        assert " ms " in line and json.dumps(results[name])[:40] in line


def test_cli_demo(tmp_path):
    env = dict(os.environ, TIDAL_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "tidal", "demo", "--max-tokens", "4", "--image", str(sample_image_path())], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("encode_image", "caption short", "query + reasoning", "detect 'car'", "point 'tree'"):
        assert name in out.stdout
