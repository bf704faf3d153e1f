"""`limner eval` and `limner bench`: the command line of the evaluation protocol and the bench."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from limner.commands.options import BaseOpt, DeviceOpt, command, output_folder, removed_if_failed
from limner.errors import LimnerError


@command
def eval_cmd(
    method: Annotated[
        Optional[list[str]], typer.Option("--method", help="A method to personalize with (repeatable).")
    ] = None,
    concept: Annotated[
        Optional[list[Path]], typer.Option("--concept", help="An existing concept folder to score (repeatable).")
    ] = None,
    subjects: Annotated[
        str,
        typer.Option(
            "--subjects", help="world, world:objects, world:identities, world:NAME,..., a folder or a manifest."
        ),
    ] = "world:objects",
    class_noun: Annotated[
        Optional[str], typer.Option("--class-noun", help="Class noun for a subject folder without subject.json.")
    ] = None,
    images: Annotated[int, typer.Option("-n", "--images-per-prompt")] = 4,
    prompts: Annotated[
        Optional[int], typer.Option("--prompts", help="Use only the first K prompts of each subject.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    steps: Annotated[int, typer.Option("--steps")] = 25,
    guidance: Annotated[float, typer.Option("--guidance")] = 5.0,
    bounds: Annotated[
        bool, typer.Option("--bounds/--no-bounds", help="Include the lower/upper reference rows.")
    ] = True,
    clip: Annotated[
        Optional[Path], typer.Option("--clip", help="Local CLIPModel folder (default on the world: the world's CLIP).")
    ] = None,
    dino: Annotated[Optional[Path], typer.Option("--dino", help="Local DINO / DINOv2 folder.")] = None,
    face: Annotated[
        Optional[Path],
        typer.Option("--face", help="Local insightface model folder (default on the world: its identity embedder)."),
    ] = None,
    cache: Annotated[
        Path, typer.Option("--cache", help="Cache of concepts and generated images (reruns do no work twice).")
    ] = Path(".limner-cache"),
    out: Annotated[
        Path, typer.Option("--out", help="Report folder: results.json, results.md, plots, index.html.")
    ] = Path("eval-report"),
    html_prompts: Annotated[int, typer.Option("--html-prompts", help="Prompts per subject shown in index.html.")] = 8,
    html_images: Annotated[
        int, typer.Option("--html-images", help="Images per prompt and method shown in index.html.")
    ] = 4,
    layout_steps: Annotated[
        Optional[int],
        typer.Option(
            "--layout-steps",
            help="A concept's first K denoising steps follow the class prompt (the layout), the rest its own; "
            "default: the method's (Textual Inversion: a fifth), 0: off.",
        ),
    ] = None,
    base: BaseOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Score methods with the DreamBench protocol (real subjects) or the world bench.

    --method takes METHOD or METHOD:key=value,... with method or training settings (e.g.
    dreambooth_lora:prior_preservation=none,max_steps=600)."""
    from limner.evaluation.protocol import LOWER, UPPER, EvalSettings, Row, build_encoders, run_eval
    from limner.evaluation.report import markdown_table, write_report
    from limner.evaluation.subjects import load_subjects
    from limner.methods import get_method

    settings = EvalSettings(
        images_per_prompt=images,
        seed=seed,
        steps=steps,
        guidance=guidance,
        max_prompts=prompts,
        layout_steps=layout_steps,
    )
    output_folder(out)
    output_folder(cache, "--cache")
    subs = load_subjects(subjects, class_noun)
    world = all(s.world is not None for s in subs)
    rows = ([Row(LOWER)] + ([Row(UPPER)] if world else [])) if bounds else []
    rows += [Row.parse(m) for m in method or []] + [Row.for_concept(c) for c in concept or []]
    if not rows:
        raise LimnerError("nothing to evaluate: give --method or --concept, or keep --bounds")
    for r in rows:
        if r.method:
            get_method(r.method)  # fails early, naming the available methods
    enc = build_encoders(world, base, clip, dino, face, device)
    with removed_if_failed(out):
        results = run_eval(rows, subs, enc, cache, settings, base=base, device=device)
        written = write_report(results, out, html_prompts, html_images)
    typer.echo(markdown_table(results))
    typer.echo(
        f"report: {written['html']} ({results['seconds']:.0f} s; cache hits {results['cache']['hits']}, "
        f"misses {results['cache']['misses']})"
    )


@command
def bench_cmd(
    method: Annotated[
        Optional[list[str]],
        typer.Option(
            "--method",
            help="Methods to measure (repeatable): METHOD or METHOD:key=value,... "
            "with method or trainer settings, e.g. dreambooth_lora:mixed_precision=fp16.",
        ),
    ] = None,
    subject: Annotated[
        str, typer.Option("--subject", help="One subject (world:NAME or a folder).")
    ] = "world:duo_ball",
    class_noun: Annotated[
        Optional[str], typer.Option("--class-noun", help="Class noun for a subject folder without subject.json.")
    ] = None,
    images: Annotated[int, typer.Option("-n", "--images", help="Images to time per row.")] = 8,
    steps: Annotated[int, typer.Option("--steps")] = 25,
    cache: Annotated[Path, typer.Option("--cache")] = Path(".limner-cache"),
    out: Annotated[Path, typer.Option("--out", help="Report folder (bench.json, bench.md).")] = Path("eval-report"),
    base: BaseOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Time and memory per method (training and generation), each measured in its own process."""
    from limner.evaluation.bench import markdown, run_bench
    from limner.evaluation.protocol import LOWER, Row
    from limner.evaluation.subjects import load_subjects
    from limner.io import write_json_atomic, write_text_atomic
    from limner.methods import get_method

    for m in method or []:
        name = Row.parse(m).method
        if name is None:
            raise LimnerError(
                f"--method {m}: bench measures the lower bound first by itself; name methods to compare with it"
            )
        get_method(name)
    if images < 1 or steps < 1:
        raise LimnerError("-n/--images and --steps must be at least 1")
    if len(load_subjects(subject, class_noun)) != 1:
        raise LimnerError(f"--subject {subject} holds several subjects; bench measures one")
    output_folder(out)
    records = run_bench([LOWER] + list(method or []), subject, base, device, images, steps, cache, class_noun)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "bench.json", records)
    write_text_atomic(out / "bench.md", markdown(records))
    typer.echo(markdown(records))
    typer.echo(f"written: {out / 'bench.json'}, {out / 'bench.md'}")
