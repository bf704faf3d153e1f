"""Files: writing them so that an interruption never leaves a half-written one (temporary name, then
rename), reading weight files so that a damaged one is one line naming it, where limner caches what it can
recompute, and which files are images."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

# the files limner reads as images in a folder (references, masks, retrieval pools)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def cache_dir(kind: str) -> Path:
    """Where limner keeps what it can recompute (class images, retrieval indexes): $LIMNER_CACHE or
    ~/.cache/limner, one sub-folder per kind."""
    return Path(os.environ.get("LIMNER_CACHE") or Path.home() / ".cache" / "limner").expanduser() / kind


def child(folder: Path, name: str, what: str) -> Path:
    """`folder / name` where `name` comes from what a user gave (a token, a class noun, a subject's name, a
    manifest's file name): refused unless it is one plain entry of `folder`, so nothing is ever read or
    written outside the folders the user named or the cache (`../x`, `/etc/x`, `a/b` all fail)."""
    from limner.errors import LimnerError

    path = Path(folder) / name
    if name in ("", ".", "..") or Path(name).name != name or "\\" in name or path.parent != Path(folder):
        raise LimnerError(f"{what} {name!r} would name a path outside {folder}; give a plain name")
    return path


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


def replace_folder(folder: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills a temporary folder beside `folder` (tmp does not exist yet), which then takes `folder`'s
    place: a reader never finds half a folder there, and a failed write leaves `folder` as it was."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_folder(source: Path, folder: Path) -> None:
    """`source` copied to `folder` through replace_folder."""
    replace_folder(folder, lambda tmp: shutil.copytree(source, tmp))


def write_text_atomic(path: Path, text: str) -> None:
    with written_atomically(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, a quota, a file-size limit (RLIMIT_FSIZE)


def is_disk_full(e: BaseException) -> bool:
    """Whether a write failed for want of space: an OSError saying so, or a library's own error that carries the
    OS error only in its text (safetensors: "I/O error: No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno in FULL_DISK
    return any(f"(os error {n})" in str(e) for n in FULL_DISK)


@contextmanager
def disk_guard(what: str):
    """Turns a full disk into a clear error. Everything limner writes goes to a temporary name first,
    so whatever was there before is intact."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            from limner.errors import LimnerError

            raise LimnerError(
                f"the disk is full while writing {what}; earlier files are intact. Free some space and run the "
                "same command again (training continues with --resume latest)"
            ) from e
        raise


PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}


def damaged(path: Path, reason: str) -> Exception:
    """The one-line error for a weight file that cannot be read."""
    from limner.errors import LimnerError

    return LimnerError(f"{path} is damaged ({reason}); replace it with a whole copy (download or train it again)")


def check_safetensors(path: Path) -> None:
    """Reads only the header of a .safetensors file and checks that the file holds every byte it declares, so
    a truncated or foreign file is found before a library reads it (whose error names no file)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise damaged(path, f"not a safetensors file, or cut short: {size} bytes")
        try:
            header = json.loads(f.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise damaged(path, f"its safetensors header does not parse: {type(e).__name__}") from e
    if 8 + length + end > size:
        raise damaged(path, f"truncated: {size} of its {8 + length + end} bytes")


def check_weight_files(folder: Path) -> None:
    """check_safetensors on every .safetensors file in a model folder and its components' folders."""
    for path in sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*/*.safetensors")):
        check_safetensors(path)


# The user's --allow-pickle for this call, for the weight files concept folders point to (an official .bin adapter
# a concept was encoded with). A concept records how it was made, never a permission: a folder someone shares
# cannot opt its reader into unpickling, so installing reads what this flag says, not what the concept recorded.
_PICKLE_OPT_IN: ContextVar[bool] = ContextVar("limner_pickle_opt_in", default=False)


@contextmanager
def pickles_allowed(allowed: bool) -> Iterator[None]:
    """Within this block, `pickle_opt_in()` is `allowed` (the command's --allow-pickle)."""
    token = _PICKLE_OPT_IN.set(bool(allowed))
    try:
        yield
    finally:
        _PICKLE_OPT_IN.reset(token)


def pickle_opt_in() -> bool:
    """Whether the running command was given --allow-pickle (see `pickles_allowed`)."""
    return _PICKLE_OPT_IN.get()


def read_tensors(path: Path, allow_pickle: bool = False) -> dict:
    """A weight file's tensors: .safetensors (checked whole first), or a pickle (.bin, .pt, ...) only with
    `allow_pickle`, then read with torch.load(weights_only=True), which runs no code from the file. A file that
    cannot be read is one LimnerError naming it."""
    import torch
    from safetensors.torch import load_file

    from limner.errors import LimnerError

    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LimnerError(
                f"{path} is a pickle file; limner reads one only with --allow-pickle, then with "
                "torch.load(weights_only=True) (only files you trust). Prefer a .safetensors file."
            )
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling fails in many ways (truncated, foreign, not weights-only)
            raise damaged(path, f"it does not unpickle as weights: {first_line(e)}") from e
    check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors' own error type names no file
        raise damaged(path, first_line(e)) from e


def first_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
