"""What every `limner` command shares: the base and device options, and turning a LimnerError into
one line on stderr and exit code 2."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from limner.errors import LimnerError

BaseOpt = Annotated[
    Optional[str],
    typer.Option(
        "--base", help="A local SD 1.x/2.x/SDXL diffusers folder or .safetensors file. Default: the world base."
    ),
]
ConfigOpt = Annotated[
    Optional[str],
    typer.Option("--config", help="For a single-file --base: a local diffusers folder of the same architecture."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
# the trainer's options that `limner train` and `limner pretrain` share
MixedPrecisionOpt = Annotated[Optional[str], typer.Option("--mixed-precision", help="no (default), fp16 or bf16.")]
ResumeOpt = Annotated[Optional[str], typer.Option("--resume", help="'latest' or a checkpoint folder.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Default 0.")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (fp16 on GPUs, fp32 on CPU and for the world base), fp32, fp16 or bf16.")
]
FacesOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--faces",
        help="Identity methods: an insightface model folder (e.g. antelopev2, buffalo_l: detection and recognition "
        ".onnx files) that finds and embeds the faces in real photos. Default: the world's face analyser.",
    ),
]


def faces_setting(method, faces: Path | None) -> dict[str, str]:
    """`--faces DIR` as the identity methods' `faces` setting ({} without it), the folder checked before any work:
    a folder without its detector or recogniser is told now, naming the files expected, not after the base loads."""
    if faces is None:
        return {}
    if method.family != "identity":
        raise LimnerError(
            f"--faces: {method.name} finds no faces; the option is for the identity methods (photomaker, instantid, "
            "storymaker)"
        )
    from limner.encoders.faces import face_analysis

    face_analysis(faces)  # raises a LimnerError naming what the folder lacks
    return {"faces": str(faces)}


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# a folder that is read-only or not the user's: told in one line naming the path, like a LimnerError (as is a full
# disk, limner.io.is_disk_full)
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def refused_by_the_system(e: Exception) -> str | None:
    """The one-line message for a write the system refused, or None for any other error (a bug: its traceback)."""
    from limner.io import is_disk_full

    filename = getattr(e, "filename", None)
    where = f" ({filename})" if filename else ""
    if is_disk_full(e):
        return (
            f"the disk is full{where}; files written before are intact. Free some space and run the same command "
            "again (a training continues with --resume latest)"
        )
    if isinstance(e, OSError) and e.errno in DENIED:
        return f"cannot write{where}: {e.strerror}; choose a folder you can write to (--out)"
    return None


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command body whose LimnerError, or a write the system refuses (full disk, read-only folder), becomes a
    one-line message and exit code 2."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LimnerError as e:
            fail(str(e), e.exit_code)
        except Exception as e:  # noqa: BLE001 - only the system's refusals are told here; the rest is raised
            if (message := refused_by_the_system(e)) is None:
                raise
            fail(message)

    return run


def output_folder(out: Path, flag: str = "--out") -> Path:
    if out.exists() and not out.is_dir():
        raise LimnerError(f"{flag} {out} is a file; give a folder")
    return out


def check_concept_output(out: Path, resume: str | None, force: bool) -> None:
    """`--out` of a training, checked before any work: a finished concept, or an interrupted run's checkpoints,
    is never overwritten unless the user says how (--resume latest continues it, --force trains it again)."""
    from limner.concepts import MANIFEST, read_manifest

    output_folder(out)
    if resume or force:
        return
    if (out / MANIFEST).is_file():
        done = read_manifest(out)
        raise LimnerError(
            f"--out {out} already holds a {done.get('method')} concept ({done.get('steps')} steps); nothing was "
            "overwritten. Continue it with --resume latest (and more --steps), train it again with --force, or "
            "choose another --out"
        )
    if any((out / "checkpoints").glob("step-*")):
        raise LimnerError(
            f"--out {out} holds an interrupted run's checkpoints; continue it with --resume latest, start again "
            "with --force, or choose another --out"
        )


@contextmanager
def removed_if_failed(out: Path) -> Iterator[None]:
    """A folder this command creates is removed when the command fails before leaving anything resumable in it
    (a checkpoint), so a failed run leaves no empty or half-filled folder behind; a folder that was there
    before is left as it is."""
    from limner.training import is_main_process

    created = not out.exists()
    try:
        yield
    except BaseException:
        if created and out.is_dir() and not any((out / "checkpoints").glob("*")) and is_main_process():
            shutil.rmtree(out, ignore_errors=True)
        raise


def echo_notes(caught: list[warnings.WarningMessage], prefix: str = "note") -> None:
    """Shows limner's own warnings (notes on what it did), not the libraries' deprecations."""
    for w in caught:
        if issubclass(w.category, UserWarning) and f"{os.sep}limner{os.sep}" in w.filename:
            typer.echo(f"{prefix}: {w.message}", err=True)
