"""`limner app`: the browser UI (gradio) over every method, on the world base unless --base is given."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from limner.commands.options import BaseOpt, command


@command
def app_cmd(
    port: Annotated[int, typer.Option("--port", help="The port to listen on.")] = 7860,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help="The address to listen on. Another than 127.0.0.1 lets other machines in (there is no login).",
        ),
    ] = "127.0.0.1",
    library: Annotated[
        Path,
        typer.Option(
            "--library", help="Folder of concepts, adapters, jobs (jobs.sqlite) and outputs; made if missing."
        ),
    ] = Path("limner-library"),
    share: Annotated[
        bool, typer.Option("--share", help="Also make gradio's public share link (off by default).")
    ] = False,
    base: BaseOpt = None,
) -> None:
    """Open limner in the browser: personalize, generate, compare, browse the library, evaluate."""
    from limner.app.server import serve

    serve(library, base=base, host=host, port=port, share=share)
