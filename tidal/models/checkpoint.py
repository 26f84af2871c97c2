"""Hugging Face checkpoint folders, for every model: finding one (a local folder or a
Hub repo id), its config.json, and its safetensors weights (one file, or shards
listed by an index)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from tidal.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def resolve_checkpoint(path_or_repo: str | os.PathLike[str]) -> Path:
    """A local checkpoint folder, or a Hugging Face repo id downloaded to the hub cache."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    name = str(path_or_repo)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"no checkpoint folder at {path}, and {name!r} is not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # network, auth, or missing repo: say what to do instead
        raise CheckpointError(
            f"could not fetch {name!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            f"If this machine is offline, download the repo elsewhere (huggingface-cli download {name}) "
            "and pass the local folder instead."
        ) from exc


def read_json(folder: Path, name: str = "config.json") -> dict[str, Any]:
    """A JSON file of the checkpoint, or CheckpointError saying what is wrong."""
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def weight_files(folder: Path) -> dict[str, Path]:
    """Map every tensor key to the safetensors file that holds it."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = {key: folder / fname for key, fname in weight_map.items()}
        absent = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if absent:
            raise CheckpointError(f"{index} lists shards that are not in {folder}: {', '.join(absent)}")
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    with safe_open(str(single), framework="pt") as f:
        return {key: single for key in f.keys()}


def iter_weights(files: dict[str, Path], device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[Path, list[str]] = {}
    for key, path in files.items():
        by_file.setdefault(path, []).append(key)
    with tqdm(total=len(files), desc="loading weights", unit="tensor", disable=None) as bar:
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt", device=device) as f:
                for key in keys:
                    yield key, f.get_tensor(key)
                    bar.update(1)


def build_and_load(make: Callable[[], torch.nn.Module], files: dict[str, Path], device: torch.device | str, dtype: torch.dtype) -> Any:
    """`make()` on the meta device, cast while still there (so the real
    allocation happens once, in `dtype`), allocated on `device`, then filled
    by its `load_weights` from `files` (strict: each model says what is
    missing) -> the model in eval mode, without gradients."""
    with torch.device("meta"):
        model = make()
    model = model.to(dtype).to_empty(device=device)
    load_device = str(device) if torch.device(device).type == "cuda" else "cpu"
    model.load_weights(iter_weights(files, load_device))
    return model.eval().requires_grad_(False)


def raise_weight_problems(architecture: str, missing: list[str], unexpected: list[str], mismatched: list[str] = ()) -> None:
    """A strict load's verdict: CheckpointError naming (the first few of) the
    missing weights, the unexpected ones and the shape mismatches; nothing
    when all three are empty."""
    problems = []
    if missing:
        problems.append(f"missing weights ({len(missing)}): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected weights ({len(unexpected)}): {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_names(list(mismatched))}")
    if problems:
        raise CheckpointError(f"checkpoint does not match the {architecture} architecture: " + "; ".join(problems))


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
