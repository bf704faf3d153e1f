"""The `limner` command line. Every command is a thin layer over the Python API of the same name."""

from __future__ import annotations

import atexit
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from limner.cli_options import BaseOpt, ConfigOpt, DeviceOpt, DtypeOpt, command, echo_notes, output_folder
from limner.errors import LimnerError
from limner.evaluation.cli import bench_cmd, eval_cmd
from limner.world.cli import world_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Subject-driven personalization of text-to-image diffusion models.")


@app.command()
@command
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    num_images: Annotated[int, typer.Option("-n", "--num-images")] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    steps: Annotated[int, typer.Option("--steps")] = 25,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 5.0,
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    scheduler: Annotated[str, typer.Option("--scheduler", help="dpm++, ddim, euler, euler_a or unipc.")] = "dpm++",
    height: Annotated[Optional[int], typer.Option("--height", help="Default: the base's native size.")] = None,
    width: Annotated[Optional[int], typer.Option("--width")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 4,
    regions: Annotated[bool, typer.Option("--regions", help="The prompt is several prompts separated by BREAK, drawn left to right, "
                                          "each in its own window of a wider canvas (MultiDiffusion): composes concepts a single "
                                          "prompt cannot place together.")] = False,
    out: Annotated[Path, typer.Option("--out", help="Folder for PNGs, grid and JSON record.")] = Path("out"),
    concept: Annotated[Optional[list[Path]], typer.Option("--concept", help="A concept folder to apply (repeatable: concepts compose).")] = None,
    embedding: Annotated[Optional[list[str]], typer.Option("--embedding", help="A Textual Inversion file, FILE or FILE:TOKEN (diffusers, A1111/kohya, SDXL).")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow .pt/.bin embeddings (read with weights_only=True).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Apply concepts trained on another base anyway.")] = False,
    layout_steps: Annotated[Optional[int], typer.Option("--layout-steps", help="The first K denoising steps follow the prompt with each concept's "
                                                        "token replaced by its class noun (default: the concepts' method's; Textual "
                                                        "Inversion: a fifth of --steps), 0: off.")] = None,
    base: BaseOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Generate images from a prompt (on the world base unless --base is given)."""
    from limner.conditioning import apply_concepts
    from limner.generation import GenerationSettings, check_settings, generate, prepare_output
    from limner.methods.textual_inversion import load_embedding_spec
    from limner.models.loading import load_base
    from limner.regions import split_regions

    if regions and layout_steps:
        raise LimnerError("--layout-steps does not work with --regions yet; draw without one of them")
    settings = GenerationSettings(prompt=prompt, negative_prompt=negative, num_images=num_images, seed=seed, steps=steps,
                                  guidance_scale=guidance, scheduler=scheduler, height=height, width=width, batch_size=batch_size,
                                  regions=regions)
    b = load_base(base, device=device, dtype=dtype, config=config)
    check_settings(b, settings)
    prepare_output(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = apply_concepts(b, concept or [], split_regions(prompt) if regions else None, force)
    echo_notes(caught)
    conditioning = applied.condition(prompt, steps, layout_steps)
    for spec in embedding or []:
        if (token := load_embedding_spec(b, spec, allow_pickle)) not in prompt:
            typer.echo(f"warning: the prompt does not contain the embedding's token {token!r}", err=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = generate(b, settings, out, conditioning)
    for w in caught:
        if "tokenizer's limit" in str(w.message):
            typer.echo(f"warning: {w.message}", err=True)
    t = result.record["timings"]
    typer.echo(f"wrote {len(result.paths)} images, grid and record to {out}/ ({t['per_image_s']:.2f} s per image)")


@app.command("train")
@command
def train_cmd(
    method: Annotated[str, typer.Option("--method", help="The method to personalize with.")],
    subject: Annotated[str, typer.Option("--subject", help="world:NAME, a folder of reference images, or (Custom Diffusion, "
                                                 "trained jointly) world:A,B or a JSON list of subjects.")],
    out: Annotated[Path, typer.Option("--out", help="The concept folder to write.")],
    class_noun: Annotated[Optional[str], typer.Option("--class-noun")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="The new token / identifier.")] = None,
    num_vectors: Annotated[Optional[int], typer.Option("--num-vectors", help="Textual Inversion: vectors per token.")] = None,
    mixed_precision: Annotated[Optional[str], typer.Option("--mixed-precision", help="no (default), fp16 or bf16.")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="'latest' or a checkpoint folder.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Default 0.")] = None,
    setting: Annotated[Optional[list[str]], typer.Option("--set", help="A method setting KEY=VALUE (repeatable), "
                                                          "or trainer setting, e.g. --set prior_preservation=none --set checkpoint_every=50.")] = None,
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
        raise LimnerError(f"--subject {subject} holds {len(subs)} subjects; {method} trains one at a time "
                          "(Custom Diffusion trains several jointly)")
    if mixed_precision not in (None, "no", "fp16", "bf16"):
        raise LimnerError(f"--mixed-precision {mixed_precision!r}: use no, fp16 or bf16")
    output_folder(out)
    overrides = command_line_settings(m, setting or [], len(subs), token, num_vectors, max_steps=steps, learning_rate=lr,
                                      batch_size=batch_size, mixed_precision=mixed_precision, resume=resume, seed=seed)
    b = load_base(base, device=device, dtype="fp32")  # trainable weights stay fp32; --mixed-precision speeds it up
    folder = m.personalize(b, subs if len(subs) > 1 else subs[0], out, **overrides)
    finish_processes()
    if is_main_process():
        typer.echo(f"concept written to {folder}")


@app.command("demo")
@command
def demo_cmd(
    subject: Annotated[str, typer.Option("--subject", help="A held-out world subject (see `limner world subjects`).")] = "duo_ball",
    method: Annotated[Optional[str], typer.Option("--method", help="Default: the best fidelity per minute on the world bench.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps (default: 150 for DreamBooth, the method's own otherwise).")] = None,
    out: Annotated[Path, typer.Option("--out")] = Path("demo"),
    device: DeviceOpt = "auto",
) -> None:
    """Personalize a held-out world subject and draw it in 4 new contexts (a few minutes on a CPU)."""
    from limner.demo import DEFAULT_METHOD, format_summary, run_demo

    record = run_demo(out, subject_name=subject, method_name=method or DEFAULT_METHOD, steps=steps, device=device)
    typer.echo(format_summary(record))


@app.command("merge")
@command
def merge_cmd(
    concepts: Annotated[list[Path], typer.Argument(help="Custom Diffusion concept folders (distinct modifier tokens).")],
    out: Annotated[Path, typer.Option("--out", help="The merged concept folder.")],
    force: Annotated[bool, typer.Option("--force", help="Merge concepts trained on another base anyway.")] = False,
    captions: Annotated[Optional[Path], typer.Option("--captions", help="Text file, one caption per line: the first 200 are the prompts whose "
                                                     "meaning the merge keeps (the paper uses real captions). Default: the world's captions, "
                                                     "or varied generic ones.")] = None,
    base: BaseOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Merge separately trained Custom Diffusion concepts in closed form (no training)."""
    from limner.methods.custom_diffusion import merge
    from limner.models.loading import load_base

    if len(concepts) < 2:
        raise LimnerError("merge needs at least two concept folders")
    output_folder(out)
    b = load_base(base, device=device, dtype="fp32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = merge(b, concepts, out, force=force, captions=captions)
    echo_notes(caught)
    typer.echo(f"merged concept written to {folder}")


@app.command("methods")
@command
def methods_cmd(
    name: Annotated[Optional[str], typer.Argument(help="A method: list its settings (for --set) with defaults and help.")] = None,
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


app.command("eval")(eval_cmd)
app.command("bench")(bench_cmd)
app.add_typer(world_app, name="world")


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
