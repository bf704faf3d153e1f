"""The `limner` command line. Every command is a thin layer over the Python API of the same name; each
lives in its own module of limner.commands, and this one assembles them and runs the process."""

from __future__ import annotations

import atexit
import os
import sys
from typing import Annotated, NoReturn

import typer

from limner.commands.app import app_cmd
from limner.commands.demo import demo_cmd
from limner.commands.evaluate import bench_cmd, eval_cmd
from limner.commands.export import export_cmd
from limner.commands.generate import generate
from limner.commands.merge import merge_cmd
from limner.commands.methods import methods_cmd
from limner.commands.pretrain import pretrain_cmd
from limner.commands.train import train_cmd
from limner.commands.world import world_app

app = typer.Typer(
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish and PowerShell
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Subject-driven personalization of text-to-image diffusion models.",
)
app.command("generate")(generate)
app.command("train")(train_cmd)
app.command("pretrain")(pretrain_cmd)
app.command("demo")(demo_cmd)
app.command("merge")(merge_cmd)
app.command("export")(export_cmd)
app.command("methods")(methods_cmd)
app.command("eval")(eval_cmd)
app.command("bench")(bench_cmd)
app.command("app")(app_cmd)
app.add_typer(world_app, name="world")


def show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"limner {version('limner')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("limner (not installed)")
        raise typer.Exit()


@app.callback()
def options(
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Also show the libraries' own loading bars, notices and warnings.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Hide limner's progress bars (results, notes, errors still print).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=show_version, is_eager=True, help="Print limner's version and exit."),
    ] = False,
) -> None:
    """Subject-driven personalization of text-to-image diffusion models."""
    from limner.progress import set_quiet

    set_quiet(quiet)
    if not verbose:
        quiet_libraries()


def quiet_libraries() -> None:
    """A user sees limner's progress bars and results. diffusers and transformers draw a bar for every
    pipeline they load ("Loading pipeline components", "Loading weights") and write ("Writing model
    shards"), and log notices that concern their own internals: those stay off unless --verbose. peft warns
    whenever a second LoRA joins a model, which limner does on purpose (LoRA concepts drawn together)."""
    import warnings

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model")


def quiet_torchvision_fallback() -> None:
    """limner does its image work with PIL, numpy and torch, and does not install torchvision (the
    registry's build does not work beside torch's CPU build). Without it transformers says, on every
    run, that it falls back to the PIL image processors: the ones limner wants. That line is dropped;
    every other transformers message stays."""
    import logging

    class DropFallbackNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "requires torchvision (not installed); falling back" not in record.getMessage()

    logging.getLogger("transformers.utils.import_utils").addFilter(DropFallbackNotice())


def main() -> None:
    code: int | str | None = 0
    quiet_torchvision_fallback()
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        code = 130
    except SystemExit as e:
        code = e.code
    exit_without_teardown(code)


def exit_without_teardown(code: int | str | None) -> NoReturn:
    """Ends the process once a command has finished: runs the exit handlers that Python code registered
    (log flushing, temporary files, locks), then skips the interpreter's teardown of torch and the other
    native libraries. That teardown does nothing a finished command needs; it costs about a second,
    and with CUDA builds of torch it raises the process's peak memory by ~120 MiB as the libraries
    unload (measured: `import torch, diffusers` peaks at 826 MiB with it, 700 without)."""
    if code is not None and not isinstance(code, int):  # as Python does: print the value, exit 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # noqa: SLF001 - the handlers a normal exit would run
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (limner ... | head): nothing left to deliver
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    main()
