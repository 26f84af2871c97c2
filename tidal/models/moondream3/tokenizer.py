"""Loading the Moondream 3 tokenizer (a `tokenizers` tokenizer.json)."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer

from tidal.errors import CheckpointError

DEFAULT_TOKENIZER_REPO = "moondream/starmie-v1"
TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(checkpoint: Path | None, tokenizer: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Find the tokenizer: an explicit file, folder or repo id; else the checkpoint's
    tokenizer.json; else the real model's tokenizer repo on the Hugging Face Hub."""
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        if path.is_file():
            return _from_file(path)
        if (path / TOKENIZER_FILE).is_file():
            return _from_file(path / TOKENIZER_FILE)
        return _from_hub(str(tokenizer), checkpoint)
    if checkpoint is not None and (checkpoint / TOKENIZER_FILE).is_file():
        return _from_file(checkpoint / TOKENIZER_FILE)
    return _from_hub(DEFAULT_TOKENIZER_REPO, checkpoint)


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable tokenizer.json: {exc}") from exc


def _from_hub(repo: str, checkpoint: Path | None) -> Tokenizer:
    from huggingface_hub import hf_hub_download

    try:
        return _from_file(Path(hf_hub_download(repo, TOKENIZER_FILE)))
    except CheckpointError:
        raise
    except Exception as exc:
        where = f"{checkpoint}/{TOKENIZER_FILE}" if checkpoint is not None else "a local file"
        raise CheckpointError(
            f"could not fetch {TOKENIZER_FILE} from the Hugging Face repo {repo!r} ({type(exc).__name__}). "
            f"Download https://huggingface.co/{repo}/resolve/main/{TOKENIZER_FILE} and put it at {where}, "
            "or pass tokenizer=PATH."
        ) from exc
