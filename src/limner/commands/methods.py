"""`limner methods [NAME]`: what each method can do, and its settings with their help."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from limner.commands.options import command


@command
def methods_cmd(
    name: Annotated[
        Optional[str], typer.Argument(help="A method: list its settings (for --set) with defaults and help.")
    ] = None,
) -> None:
    """List the methods, or one method's settings."""
    from limner.methods import get_method, method_names
    from limner.methods.settings import describe

    if name is None:
        for n in method_names():
            m = get_method(n)
            can = ", ".join(k for k, v in vars(m.capabilities).items() if v) or "-"
            typer.echo(f"{n:20} {m.family:9} capabilities: {can}")
        return
    m = get_method(name)
    if m.config_cls is None:
        typer.echo(f"{name} has no settings")
        return
    for key, default, text in describe(m.config_cls):
        if key != "train":
            typer.echo(f"{key} = {default!r}\n    {text}")
    train = m.default_train_config()
    if train is not None:
        typer.echo("trainer settings (--set too): " + ", ".join(f"{k}={v!r}" for k, v in vars(train).items()))
    for recipe, settings in m.recipes().items():
        typer.echo(f"--set recipe={recipe} sets: " + ", ".join(f"{k}={v!r}" for k, v in settings.items()))
