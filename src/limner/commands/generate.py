"""`limner generate`: draw from a prompt, with any concept folders applied through limner.conditioning."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from limner.commands.options import BaseOpt, ConfigOpt, DeviceOpt, DtypeOpt, command, echo_notes
from limner.errors import LimnerError


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
    regions: Annotated[
        bool,
        typer.Option(
            "--regions",
            help="The prompt is several prompts separated by BREAK, drawn left to right, "
            "each in its own window of a wider canvas (MultiDiffusion): composes concepts a single "
            "prompt cannot place together.",
        ),
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="Folder for PNGs, grid and JSON record.")] = Path("out"),
    concept: Annotated[
        Optional[list[Path]],
        typer.Option("--concept", help="A concept folder to apply (repeatable: concepts compose)."),
    ] = None,
    embedding: Annotated[
        Optional[list[str]],
        typer.Option(
            "--embedding", help="A Textual Inversion file, FILE or FILE:TOKEN (diffusers, A1111/kohya, SDXL)."
        ),
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Allow .pt/.bin embeddings (read with weights_only=True).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Apply concepts trained on another base anyway.")] = False,
    layout_steps: Annotated[
        Optional[int],
        typer.Option(
            "--layout-steps",
            help="The first K denoising steps follow the prompt with each concept's "
            "token replaced by its class noun (default: the concepts' method's; Textual "
            "Inversion: a fifth of --steps), 0: off.",
        ),
    ] = None,
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
    settings = GenerationSettings(
        prompt=prompt,
        negative_prompt=negative,
        num_images=num_images,
        seed=seed,
        steps=steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        height=height,
        width=width,
        batch_size=batch_size,
        regions=regions,
    )
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
