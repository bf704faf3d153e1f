"""Files: writing them so that an interruption never leaves a half-written one (temporary name, then
rename), where limner caches what it can recompute, and which files are images."""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path

# the files limner reads as images in a folder (references, masks, retrieval pools)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def cache_dir(kind: str) -> Path:
    """Where limner keeps what it can recompute (class images, retrieval indexes): $LIMNER_CACHE or
    ~/.cache/limner, one sub-folder per kind."""
    return Path(os.environ.get("LIMNER_CACHE") or Path.home() / ".cache" / "limner").expanduser() / kind


@contextmanager
def written_atomically(path: Path):
    """Yields a temporary path to write `path` through; renamed into place when the block succeeds,
    removed when it fails. The name is unique per process: several processes filling one cache (ranks
    of `accelerate launch`, parallel evaluations) never write into each other's files."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with written_atomically(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


@contextmanager
def disk_guard(what: str):
    """Turns a full disk into a clear error. Everything limner writes goes to a temporary name first,
    so whatever was there before is intact."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            from limner.errors import LimnerError

            raise LimnerError(
                f"the disk is full while writing {what}; earlier files are intact. Free some space and run the "
                "same command again (training continues with --resume latest)"
            ) from e
        raise
