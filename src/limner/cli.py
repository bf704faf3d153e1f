"""The `limner` command line. Every command is a thin layer over the Python API of the same name."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from limner.errors import LimnerError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Subject-driven personalization of text-to-image diffusion models.")
world_app = typer.Typer(no_args_is_help=True, help="The procedural world: its renderer, base model stack and probes.")
app.add_typer(world_app, name="world")

BaseOpt = Annotated[Optional[str], typer.Option("--base", help="A local SD 1.x/2.x/SDXL diffusers folder or .safetensors file. Default: the world base.")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="For a single-file --base: a local diffusers folder of the same architecture.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp16 on GPUs, fp32 on CPU), fp32, fp16 or bf16.")]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run(fn):
    """Calls fn, turning LimnerError into a one-line message and exit code 2."""
    try:
        return fn()
    except LimnerError as e:
        fail(str(e), e.exit_code)


@app.command()
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
    out: Annotated[Path, typer.Option("--out", help="Folder for PNGs, grid and JSON record.")] = Path("out"),
    base: BaseOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Generate images from a prompt (on the world base unless --base is given)."""
    from limner.generation import GenerationSettings, SCHEDULERS, check_settings, prepare_output
    from limner.models.loading import load_base

    def go():
        if scheduler not in SCHEDULERS:
            raise LimnerError(f"--scheduler {scheduler!r} is unknown; choose one of: {', '.join(SCHEDULERS)}")
        prepare_output(out)
        settings = GenerationSettings(prompt=prompt, negative_prompt=negative, num_images=num_images, seed=seed, steps=steps,
                                      guidance_scale=guidance, scheduler=scheduler, height=height, width=width, batch_size=batch_size)
        b = load_base(base, device=device, dtype=dtype, config=config)
        check_settings(b, settings)
        from limner.generation import generate as gen

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = gen(b, settings, out)
        for w in caught:
            if "tokenizer's limit" in str(w.message):
                typer.echo(f"warning: {w.message}", err=True)
        t = result.record["timings"]
        typer.echo(f"wrote {len(result.paths)} images, grid and record to {out}/ ({t['per_image_s']:.2f} s per image)")

    run(go)


@world_app.command("build")
def world_build(
    out: Annotated[Optional[Path], typer.Option("--out", help="World folder to write (base/ and probes/). Default: the package's assets.")] = None,
    work: Annotated[Path, typer.Option("--work", help="Folder for data caches and checkpoints (resumable).")] = Path(".limner-build"),
    device: DeviceOpt = "auto",
    quick: Annotated[bool, typer.Option("--quick", help="A tiny build (minutes) to try the pipeline; not for shipping.")] = False,
) -> None:
    """Train the world's tokenizer, CLIP, VAE, UNet and probes from renders (resumable)."""
    from limner.models.loading import ASSETS
    from limner.world.build import BuildConfig, build

    cfg = BuildConfig.quick() if quick else BuildConfig()
    record = run(lambda: build(out or ASSETS / "world", work, cfg, device=device))
    typer.echo(json.dumps(record["seconds"], indent=2))


@world_app.command("check")
def world_check_cmd(
    n: Annotated[int, typer.Option("-n", help="Number of held-out prompts to generate.")] = 48,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    steps: Annotated[int, typer.Option("--steps")] = 25,
    guidance: Annotated[float, typer.Option("--guidance")] = 5.0,
    base: BaseOpt = None,
    device: DeviceOpt = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full report here.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write a grid of the generated images here.")] = None,
) -> None:
    """Generate from held-out caption combinations and report what the probes read back."""
    from limner.models.loading import load_base
    from limner.world.check import format_table, world_check

    def go():
        b = load_base(base, device=device)
        report = world_check(b, n=n, seed=seed, steps=steps, guidance=guidance, out=out)
        typer.echo(format_table(report))
        summary = {k: report[k] for k in ("accuracy", "passes_floors", "seconds_per_image")}
        typer.echo(json.dumps(summary))
        if json_out:
            json_out.write_text(json.dumps(report, indent=2))
        if not report["passes_floors"]:
            raise typer.Exit(1)

    run(go)


@world_app.command("subjects")
def world_subjects(
    out: Annotated[Path, typer.Option("--out", help="Folder to write one sub-folder of reference images per subject.")] = Path("world-subjects"),
) -> None:
    """Write the held-out world-bench subjects' 5 reference images each (objects and identities)."""
    from limner.world.bench import IDENTITIES, SUBJECTS, identity_references, subject_references

    def go():
        if out.exists() and not out.is_dir():
            raise LimnerError(f"--out {out} is a file; give a folder")
        for name, cls, refs in [(s.name, s.cls, subject_references(s)) for s in SUBJECTS] + \
                               [(b.name, b.cls, identity_references(b)) for b in IDENTITIES]:
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, r in enumerate(refs):
                r.pil().save(folder / f"{i}.png")
            (folder / "subject.json").write_text(json.dumps({"name": name, "class_noun": cls}))
        typer.echo(f"wrote {len(SUBJECTS) + len(IDENTITIES)} subjects to {out}/")

    run(go)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
