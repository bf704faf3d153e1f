"""`limner demo`: the main job on the world."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from limner.commands.options import DeviceOpt, command, echo_notes, output_folder, removed_if_failed


@command
def demo_cmd(
    subject: Annotated[
        Optional[str],
        typer.Option(
            "--subject",
            help="A held-out world subject (see `limner world subjects`; default duo_ball, or the person ada for an "
            "identity method).",
        ),
    ] = None,
    method: Annotated[
        Optional[str], typer.Option("--method", help="Default: the best fidelity per minute on the world bench.")
    ] = None,
    steps: Annotated[
        Optional[int],
        typer.Option("--steps", help="Training steps (default: 150 for DreamBooth, the method's own otherwise)."),
    ] = None,
    adapter: Annotated[
        Optional[str],
        typer.Option(
            "--adapter",
            help="Encoder methods: the pretrained adapter to encode with (default: the one limner ships for the "
            "world).",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out")] = Path("demo"),
    device: DeviceOpt = "auto",
) -> None:
    """Personalize a held-out world subject and draw it in 4 new contexts (a few minutes on a CPU; an encoder
    method such as IP-Adapter encodes the references in seconds)."""
    from limner.demo import DEFAULT_METHOD, format_summary, run_demo

    with removed_if_failed(output_folder(out)), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # limner's notes (e.g. which references an identity method took) as notes
        record = run_demo(
            out,
            subject_name=subject,
            method_name=method or DEFAULT_METHOD,
            steps=steps,
            device=device,
            adapter=adapter,
        )
    echo_notes(caught)
    typer.echo(format_summary(record))
