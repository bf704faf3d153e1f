"""What every `limner` command shares: the base and device options, and turning a LimnerError into
one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
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


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command body whose LimnerError becomes a one-line message and its exit code (2)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LimnerError as e:
            fail(str(e), e.exit_code)

    return run


def output_folder(out: Path, flag: str = "--out") -> Path:
    if out.exists() and not out.is_dir():
        raise LimnerError(f"{flag} {out} is a file; give a folder")
    return out


def echo_notes(caught: list[warnings.WarningMessage]) -> None:
    """Shows limner's own warnings (notes on what it did), not the libraries' deprecations."""
    for w in caught:
        if issubclass(w.category, UserWarning) and f"{os.sep}limner{os.sep}" in w.filename:
            typer.echo(f"note: {w.message}", err=True)
