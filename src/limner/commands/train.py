"""`limner train`: personalize a base on a subject; writes a concept folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from limner.commands.options import BaseOpt, DeviceOpt, command, output_folder
from limner.errors import LimnerError


@command
def train_cmd(
    method: Annotated[str, typer.Option("--method", help="The method to personalize with.")],
    subject: Annotated[
        str,
        typer.Option(
            "--subject",
            help="world:NAME, a folder of reference images, or (Custom Diffusion, "
            "trained jointly) world:A,B or a JSON list of subjects.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The concept folder to write.")],
    class_noun: Annotated[Optional[str], typer.Option("--class-noun")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="The new token / identifier.")] = None,
    num_vectors: Annotated[
        Optional[int], typer.Option("--num-vectors", help="Textual Inversion: vectors per token.")
    ] = None,
    mixed_precision: Annotated[
        Optional[str], typer.Option("--mixed-precision", help="no (default), fp16 or bf16.")
    ] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="'latest' or a checkpoint folder.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Default 0.")] = None,
    setting: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set",
            help="A method setting KEY=VALUE (repeatable), "
            "or trainer setting, e.g. --set prior_preservation=none --set checkpoint_every=50.",
        ),
    ] = None,
    base: BaseOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Personalize a base on a subject's reference images; writes a concept folder."""
    from limner.evaluation.subjects import load_subjects
    from limner.methods import get_method
    from limner.methods.settings import command_line_settings
    from limner.models.loading import load_base
    from limner.training import finish_processes, is_main_process

    m = get_method(method)
    subs = load_subjects(subject, class_noun)
    if len(subs) > 1 and not m.capabilities.joint:
        raise LimnerError(
            f"--subject {subject} holds {len(subs)} subjects; {method} trains one at a time "
            "(Custom Diffusion trains several jointly)"
        )
    if mixed_precision not in (None, "no", "fp16", "bf16"):
        raise LimnerError(f"--mixed-precision {mixed_precision!r}: use no, fp16 or bf16")
    output_folder(out)
    overrides = command_line_settings(
        m,
        setting or [],
        len(subs),
        token,
        num_vectors,
        max_steps=steps,
        learning_rate=lr,
        batch_size=batch_size,
        mixed_precision=mixed_precision,
        resume=resume,
        seed=seed,
    )
    b = load_base(base, device=device, dtype="fp32")  # trainable weights stay fp32; --mixed-precision speeds it up
    folder = m.personalize(b, subs if len(subs) > 1 else subs[0], out, **overrides)
    finish_processes()
    if is_main_process():
        typer.echo(f"concept written to {folder}")
