"""The check every transformers-based encoder runs on its local folder before loading it: a wrong
path gets an error that names the flag and the folder, not a download attempt or a stack trace."""

from __future__ import annotations

import json
from pathlib import Path

from limner.errors import LimnerError


def transformers_model_type(folder: Path, what: str, flag: str) -> str:
    """The folder's config.json model_type; raises when the folder is not a transformers model folder."""
    cfg = folder / "config.json"
    if not folder.is_dir() or not cfg.exists():
        raise LimnerError(
            f"{flag} {folder}: not a transformers model folder (no config.json); point it at a local {what} folder"
        )
    return json.loads(cfg.read_text()).get("model_type", "")
