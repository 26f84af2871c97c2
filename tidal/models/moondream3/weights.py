"""Finding, reading and loading Moondream 3 checkpoints in the official Hugging Face layout.

Layout: `config.json` whose `"config"` object overrides the default
architecture; weights in `model.safetensors`, or shards listed by
`model.safetensors.index.json`; every key under `model.`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from tidal.errors import CheckpointError

from .config import MoondreamConfig
from .model import Moondream3Model

logger = logging.getLogger(__name__)

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


def read_config(folder: Path) -> MoondreamConfig:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    return MoondreamConfig.from_dict(raw.get("config", {}))


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


def load_model(folder: Path, device: torch.device | str, dtype: torch.dtype) -> Moondream3Model:
    """Build Moondream 3 from a checkpoint folder on `device` in `dtype` (strict)."""
    config = read_config(folder)
    files = weight_files(folder)
    has_region_ln = any(k.startswith("model.region.ln.") for k in files)
    with torch.device("meta"):
        model = Moondream3Model(config, has_region_ln=has_region_ln)
    # Cast while still on meta so the real allocation happens once, in `dtype`.
    model = model.to(dtype).to_empty(device=device)
    load_device = str(device) if torch.device(device).type == "cuda" else "cpu"
    model.load_weights(iter_weights(files, load_device))
    model.text.setup_runtime(device)
    model.eval().requires_grad_(False)
    logger.info("loaded %s (%d tensors) on %s as %s", folder, len(files), device, dtype)
    return model
