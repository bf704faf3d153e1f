"""`limner world ...`: rebuild the world's model stack, check it, write the held-out subjects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from limner.commands.options import BaseOpt, DeviceOpt, command, fail, output_folder
from limner.errors import LimnerError

world_app = typer.Typer(no_args_is_help=True, help="The procedural world: its renderer, base model stack and probes.")


@world_app.command("build")
def world_build(
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="World folder to write (base/ and probes/). Default: the package's assets."),
    ] = None,
    work: Annotated[Path, typer.Option("--work", help="Folder for data caches and checkpoints (resumable).")] = Path(
        ".limner-build"
    ),
    device: DeviceOpt = "auto",
    quick: Annotated[
        bool, typer.Option("--quick", help="A tiny build (minutes) to try the pipeline; not for shipping.")
    ] = False,
) -> None:
    """Train the world's tokenizer, CLIP, VAE, UNet and probes from renders (resumable)."""
    from limner.models.loading import ASSETS
    from limner.world.build import BuildConfig, build

    if quick and out is None:
        fail("--quick builds a toy stack that must not replace the shipped one: give --out DIR")
    cfg = BuildConfig.quick() if quick else BuildConfig()
    record = command(build)(out or ASSETS / "world", work, cfg, device=device)
    typer.echo(json.dumps(record["seconds"], indent=2))
    typer.echo(f"world written to {out or ASSETS / 'world'}/ (base/ and probes/); work files in {work}/")


@world_app.command("check")
@command
def world_check_cmd(
    n: Annotated[int, typer.Option("-n", help="Number of held-out prompts to generate.")] = 48,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    steps: Annotated[int, typer.Option("--steps")] = 25,
    guidance: Annotated[float, typer.Option("--guidance")] = 5.0,
    base: BaseOpt = None,
    device: DeviceOpt = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full report here.")] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Also write a grid of the generated images here.")
    ] = None,
) -> None:
    """Generate from held-out caption combinations and report what the probes read back."""
    from limner.models.loading import load_base
    from limner.world.check import format_table, world_check

    if json_out is not None and (json_out.is_dir() or not json_out.parent.is_dir()):
        raise LimnerError(f"--json {json_out}: give a file path in an existing folder")
    b = load_base(base, device=device)
    report = world_check(b, n=n, seed=seed, steps=steps, guidance=guidance, out=out)
    typer.echo(format_table(report))
    summary = {k: report[k] for k in ("accuracy", "passes_floors", "seconds_per_image")}
    typer.echo(json.dumps(summary))
    if json_out:
        from limner.io import write_json_atomic

        write_json_atomic(json_out, report)
    written = [str(p) for p in (json_out, out / "world-check-grid.png" if out else None) if p is not None]
    if written:
        typer.echo(f"written: {', '.join(written)}")
    if not report["passes_floors"]:
        raise typer.Exit(1)


@world_app.command("subjects")
@command
def world_subjects(
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write one sub-folder of reference images per subject.")
    ] = Path("world-subjects"),
) -> None:
    """Write the held-out world-bench subjects' 5 reference images each (objects and identities)."""
    from limner.world.bench import IDENTITIES, SUBJECTS, identity_references, subject_references

    output_folder(out)
    for name, cls, refs in [(s.name, s.cls, subject_references(s)) for s in SUBJECTS] + [
        (b.name, b.cls, identity_references(b)) for b in IDENTITIES
    ]:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(refs):
            r.pil().save(folder / f"{i}.png")
        (folder / "subject.json").write_text(json.dumps({"name": name, "class_noun": cls}))
    typer.echo(f"wrote {len(SUBJECTS) + len(IDENTITIES)} subjects to {out}/")


@world_app.command("faces")
def world_faces(
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="Folder to write the face detector to. Default: the package's assets."),
    ] = None,
    work: Annotated[Path, typer.Option("--work", help="Folder for checkpoints (resumable).")] = Path(
        ".limner-build/faces"
    ),
    measure_only: Annotated[
        bool, typer.Option("--measure-only", help="Measure the detector in --out without training it.")
    ] = False,
    redraw: Annotated[
        bool, typer.Option("--redraw/--no-redraw", help="Also measure on the world base's redrawings (slower).")
    ] = True,
    quick: Annotated[bool, typer.Option("--quick", help="A tiny run to try the pipeline; not for shipping.")] = False,
    sheet: Annotated[
        Optional[Path], typer.Option("--sheet", help="Also draw what the analysis reads on some pictures (a PNG).")
    ] = None,
) -> None:
    """Train the world's face detector on renders, then measure the world face analysis on held-out identities."""
    from limner.encoders.faces.world import WORLD_FACES, WorldFaceAnalysis
    from limner.io import write_json_atomic
    from limner.world.faces import FaceBuildConfig, measure, sheet_images, train_face_analysis
    from limner.world.faces import sheet as draw_sheet

    if quick and out is None:
        fail("--quick trains a toy detector that must not replace the shipped one: give --out DIR")
    folder = out or WORLD_FACES
    if not measure_only:
        command(train_face_analysis)(folder, work, FaceBuildConfig.quick() if quick else FaceBuildConfig())
    base = None
    if redraw:
        from limner.models.loading import load_base

        base = load_base(None, device="cpu")
    analysis = WorldFaceAnalysis(folder)
    if sheet is not None:
        draw_sheet(analysis, sheet_images(base)).save(sheet)
    metrics = command(measure)(analysis, base, per_identity=2 if quick else 8)
    record = json.loads((folder / "faces.json").read_text())
    write_json_atomic(folder / "faces.json", record | {"metrics": metrics})
    typer.echo(json.dumps(metrics, indent=2))
    typer.echo(f"face detector and its readings written to {folder}/")


@world_app.command("pose")
def world_pose(
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="Folder to write the pose ControlNet to. Default: the package's assets."),
    ] = None,
    work: Annotated[Path, typer.Option("--work", help="Folder for checkpoints (resumable).")] = Path(
        ".limner-build/pose"
    ),
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps (default 2000).")] = None,
    measure_only: Annotated[
        bool, typer.Option("--measure-only", help="Measure the ControlNet in --out without training it.")
    ] = False,
    n: Annotated[int, typer.Option("-n", help="Pictures generated to measure how well the pose is followed.")] = 24,
    device: DeviceOpt = "auto",
    quick: Annotated[bool, typer.Option("--quick", help="A tiny run to try the pipeline; not for shipping.")] = False,
) -> None:
    """Train the world's OpenPose ControlNet (StoryMaker's pose decoupling) on renders' body keypoints, then
    measure how closely generations follow a requested skeleton."""
    from limner.io import write_json_atomic
    from limner.models.loading import load_base
    from limner.world.pose import RECORD, WORLD_POSE, PoseBuildConfig, measure_pose, read_record, train_pose_controlnet

    if quick and out is None:
        fail("--quick trains a toy ControlNet that must not replace the shipped one: give --out DIR")
    if steps is not None and steps < 1:
        fail(f"--steps {steps}: give at least 1 training step")
    if n < 1:
        fail(f"-n {n}: give at least 1 picture to measure with")
    folder = (out or WORLD_POSE).resolve()
    if folder.exists() and not folder.is_dir():
        fail(f"--out {folder} is a file; give a folder")
    holds_one = (folder / "config.json").is_file() and (folder / RECORD).is_file()
    if measure_only and not holds_one:
        fail(f"--out {folder} holds no pose ControlNet limner world pose made (config.json and {RECORD})")
    if not measure_only and folder.is_dir() and any(folder.iterdir()) and not holds_one:
        fail(f"--out {folder} is a folder with other files; the ControlNet replaces its folder: give a new one")
    base = load_base(None, device=device)
    if not measure_only:
        cfg = PoseBuildConfig.quick() if quick else PoseBuildConfig()
        if steps is not None:
            cfg.steps = steps
        command(train_pose_controlnet)(base, folder, work, cfg)
    metrics = command(measure_pose)(base, folder, n=2 if quick else n, steps=4 if quick else 25)
    record = read_record(folder) | {"measured": metrics}
    write_json_atomic(folder / RECORD, record)
    typer.echo(json.dumps(metrics, indent=2))
