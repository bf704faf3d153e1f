"""`limner merge`: separately trained Custom Diffusion concepts merged in closed form."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from limner.commands.options import BaseOpt, DeviceOpt, command, echo_notes, output_folder, removed_if_failed
from limner.errors import LimnerError


def check_merge_output(out: Path, concepts: list[Path]) -> None:
    """--out must be a new folder: never one of the concepts being merged, nor another concept."""
    from limner.concepts import MANIFEST

    output_folder(out)
    if any(out.resolve() == Path(c).resolve() for c in concepts):
        raise LimnerError(f"--out {out} is one of the concepts being merged; give a new folder for the merged one")
    if (out / MANIFEST).is_file():
        raise LimnerError(
            f"--out {out} already holds a concept; nothing was overwritten. Choose another --out (or delete it first)"
        )


@command
def merge_cmd(
    concepts: Annotated[
        list[Path], typer.Argument(help="Custom Diffusion concept folders (distinct modifier tokens).")
    ],
    out: Annotated[Path, typer.Option("--out", help="The merged concept folder.")],
    force: Annotated[bool, typer.Option("--force", help="Merge concepts trained on another base anyway.")] = False,
    captions: Annotated[
        Optional[Path],
        typer.Option(
            "--captions",
            help="Text file, one caption per line: the first 200 are the prompts whose "
            "meaning the merge keeps (the paper uses real captions). Default: the world's captions, "
            "or varied generic ones.",
        ),
    ] = None,
    solve: Annotated[
        str,
        typer.Option(
            "--solve",
            help="weighted (limner's: the concepts' prompts with padding rows, a weighted least-squares "
            "constraint) or paper (the paper's equality-constrained solve on its two prompts).",
        ),
    ] = "weighted",
    base: BaseOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Merge separately trained Custom Diffusion concepts in closed form (no training)."""
    from limner.methods.custom_diffusion import merge
    from limner.models.loading import load_base

    if len(concepts) < 2:
        raise LimnerError("merge needs at least two concept folders")
    check_merge_output(out, concepts)
    b = load_base(base, device=device, dtype="fp32")
    with warnings.catch_warnings(record=True) as caught, removed_if_failed(out):
        warnings.simplefilter("always")
        folder = merge(b, concepts, out, force=force, captions=captions, solve=solve)
    echo_notes(caught)
    typer.echo(f"merged concept written to {folder}")
