"""The `limner` command line. Every command is a thin layer over the Python API of the same name."""

from __future__ import annotations

import atexit
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from limner.errors import LimnerError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Subject-driven personalization of text-to-image diffusion models.")
world_app = typer.Typer(no_args_is_help=True, help="The procedural world: its renderer, base model stack and probes.")
app.add_typer(world_app, name="world")

BaseOpt = Annotated[Optional[str], typer.Option("--base", help="A local SD 1.x/2.x/SDXL diffusers folder or .safetensors file. Default: the world base.")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="For a single-file --base: a local diffusers folder of the same architecture.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp16 on GPUs, fp32 on CPU and for the world base), fp32, fp16 or bf16.")]


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
    from limner.generation import SCHEDULERS, GenerationSettings, check_settings, prepare_output
    from limner.models.loading import load_base
    from limner.regions import split_regions

    def go():
        if scheduler not in SCHEDULERS:
            raise LimnerError(f"--scheduler {scheduler!r} is unknown; choose one of: {', '.join(SCHEDULERS)}")
        prepare_output(out)
        settings = GenerationSettings(prompt=prompt, negative_prompt=negative, num_images=num_images, seed=seed, steps=steps,
                                      guidance_scale=guidance, scheduler=scheduler, height=height, width=width, batch_size=batch_size,
                                      regions=regions)
        b = load_base(base, device=device, dtype=dtype, config=config)
        check_settings(b, settings)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generation_kwargs = apply_concepts(b, concept or [], force, split_regions(prompt) if regions else None)
        echo_notes(caught)
        if regions and layout_steps:
            raise LimnerError("--layout-steps does not work with --regions yet; draw without one of them")
        if not regions:
            from dataclasses import replace

            from limner.concepts import layout_prompt

            layout, k = layout_prompt(concept or [], prompt, steps, layout_steps)
            settings = replace(settings, layout_prompt=layout, layout_steps=k)
            check_settings(b, settings)
        for spec in embedding or []:
            from limner.methods.textual_inversion import load_embedding

            path, _, token = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
            if not Path(path).exists():
                raise LimnerError(f"--embedding {path} does not exist")
            used = load_embedding(b, Path(path), token or None, allow_pickle)
            if used not in prompt:
                typer.echo(f"warning: the prompt does not contain the embedding's token {used!r}", err=True)
        from limner.generation import generate as gen

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = gen(b, settings, out, **generation_kwargs)
        for w in caught:
            if "tokenizer's limit" in str(w.message):
                typer.echo(f"warning: {w.message}", err=True)
        t = result.record["timings"]
        typer.echo(f"wrote {len(result.paths)} images, grid and record to {out}/ ({t['per_image_s']:.2f} s per image)")

    run(go)


def echo_notes(caught: list[warnings.WarningMessage]) -> None:
    """Shows limner's own warnings (notes on what it did), not the libraries' deprecations."""
    for w in caught:
        if issubclass(w.category, UserWarning) and f"{os.sep}limner{os.sep}" in w.filename:
            typer.echo(f"note: {w.message}", err=True)


def apply_concepts(base, folders: list[Path], force: bool = False, region_prompts: list[str] | None = None) -> dict:
    """Applies concept folders to a loaded base; returns what generation needs besides.

    With regional prompts, Custom Diffusion and LoRA concepts act only in the windows whose prompt
    names their token: the returned `before_window` hook switches them per window, and
    `region_concepts` lists the concepts acting in each region for the record. Without regions,
    several Custom Diffusion concepts are merged in closed form, as applying them one after another
    would let the last overwrite the others' attention weights."""
    from limner.concepts import check_base, read_manifest
    from limner.methods import get_method
    from limner.methods.custom_diffusion import CustomDiffusion, compose
    from limner.methods.dreambooth import regional_adapters
    from limner.regions import names

    manifests = [read_manifest(folder) for folder in folders]
    for folder, manifest in zip(folders, manifests):
        check_base(manifest, folder, base, force)
    # a full DreamBooth concept replaces the UNet (in every window): it goes first, so what the others
    # add to the UNet lands on it
    full = [f for f, m in zip(folders, manifests) if m["method"] == "dreambooth" and not m.get("lora")]
    if len(full) > 1:
        raise LimnerError(f"--concept {full[0]} and --concept {full[1]} are both full DreamBooth models, and each replaces the "
                          "whole UNet; compose LoRA concepts instead (train with --method dreambooth_lora)")
    order = sorted(range(len(folders)), key=lambda i: folders[i] not in full)
    folders, manifests = [folders[i] for i in order], [manifests[i] for i in order]
    custom = [f for f, m in zip(folders, manifests) if m["method"] == CustomDiffusion.name]
    composed = bool(len(custom) > 1 or (custom and region_prompts))
    for folder, manifest in zip(folders, manifests):
        if not (composed and folder in custom):
            get_method(manifest["method"]).apply(base, folder)
    result = {}
    if region_prompts:  # for the record: which concepts act in each region
        result["region_concepts"] = [[str(f) for f, m in zip(folders, manifests)
                                      if f in full or names(prompt, m.get("tokens", []))] for prompt in region_prompts]
    hooks = []
    if composed and (hook := compose(base, custom, region_prompts, force)):
        hooks.append(hook)
    loras = [f for f, m in zip(folders, manifests) if m.get("lora")]
    if loras and region_prompts:
        hooks.append(regional_adapters(base, loras, region_prompts))
    if not hooks:
        return result

    def before_window(i: int | None) -> None:
        for hook in hooks:
            hook(i)

    return result | {"before_window": before_window}


@app.command("train")
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
    from dataclasses import replace

    from limner.evaluation.subjects import load_subjects
    from limner.methods import get_method, parse_setting
    from limner.models.loading import load_base
    from limner.training import split_train_settings

    def go():
        m = get_method(method)
        subs = load_subjects(subject, class_noun)
        joint = len(subs) > 1
        if joint and not hasattr(m, "personalize_jointly"):
            raise LimnerError(f"--subject {subject} holds {len(subs)} subjects; {method} trains one at a time "
                              "(Custom Diffusion trains several jointly)")
        if mixed_precision not in (None, "no", "fp16", "bf16"):
            raise LimnerError(f"--mixed-precision {mixed_precision!r}: use no, fp16 or bf16")
        if out.exists() and not out.is_dir():
            raise LimnerError(f"--out {out} is a file; give a folder")
        overrides = dict(parse_setting(item, "--set") for item in setting or [])
        if token is not None:
            if joint:
                raise LimnerError(f"--token: joint training names its {len(subs)} tokens <new1> to <new{len(subs)}> "
                                  "(one per subject, in --subject's order); leave --token out")
            if m.token_setting is None:
                raise LimnerError(f"--token: {method} has no token or identifier to set")
            overrides[m.token_setting] = token
        if num_vectors is not None:
            overrides["num_vectors"] = num_vectors
        train_cfg = m.default_train_config(len(subs)) if joint else m.default_train_config()
        if train_cfg is not None:
            train_cfg, overrides = split_train_settings(train_cfg, overrides)  # --set reaches the trainer too
            # options given explicitly win over --set; options left out keep what --set or the defaults say
            options = {"max_steps": steps, "learning_rate": lr, "batch_size": batch_size, "mixed_precision": mixed_precision,
                       "resume": resume, "seed": seed}
            overrides["train"] = replace(train_cfg, **{k: v for k, v in options.items() if v is not None})
        b = load_base(base, device=device, dtype="fp32")  # trainable weights stay fp32; --mixed-precision speeds it up
        folder = m.personalize_jointly(b, subs, out, **overrides) if joint else m.personalize(b, subs[0], out, **overrides)
        from limner.training import finish_processes, is_main_process

        finish_processes()
        if is_main_process():
            typer.echo(f"concept written to {folder}")

    run(go)


@app.command("demo")
def demo_cmd(
    subject: Annotated[str, typer.Option("--subject", help="A held-out world subject (see `limner world subjects`).")] = "duo_ball",
    method: Annotated[Optional[str], typer.Option("--method", help="Default: the best fidelity per minute on the world bench.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps (default: 150 for DreamBooth, the method's own otherwise).")] = None,
    out: Annotated[Path, typer.Option("--out")] = Path("demo"),
    device: DeviceOpt = "auto",
) -> None:
    """Personalize a held-out world subject and draw it in 4 new contexts (a few minutes on a CPU)."""
    from limner.demo import DEFAULT_METHOD, format_summary, run_demo

    def go():
        record = run_demo(out, subject_name=subject, method_name=method or DEFAULT_METHOD, steps=steps, device=device)
        typer.echo(format_summary(record))

    run(go)


@app.command("merge")
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

    def go():
        if len(concepts) < 2:
            raise LimnerError("merge needs at least two concept folders")
        if out.exists() and not out.is_dir():
            raise LimnerError(f"--out {out} is a file; give a folder")
        b = load_base(base, device=device, dtype="fp32")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            folder = merge(b, concepts, out, force=force, captions=captions)
        echo_notes(caught)
        typer.echo(f"merged concept written to {folder}")

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

    if quick and out is None:
        fail("--quick builds a toy stack that must not replace the shipped one: give --out DIR")
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


@app.command("eval")
def eval_cmd(
    method: Annotated[Optional[list[str]], typer.Option("--method", help="A method to personalize with (repeatable).")] = None,
    concept: Annotated[Optional[list[Path]], typer.Option("--concept", help="An existing concept folder to score (repeatable).")] = None,
    subjects: Annotated[str, typer.Option("--subjects", help="world, world:objects, world:identities, world:NAME,..., a folder or a manifest.")] = "world:objects",
    class_noun: Annotated[Optional[str], typer.Option("--class-noun", help="Class noun for a subject folder without subject.json.")] = None,
    images: Annotated[int, typer.Option("-n", "--images-per-prompt")] = 4,
    prompts: Annotated[Optional[int], typer.Option("--prompts", help="Use only the first K prompts of each subject.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    steps: Annotated[int, typer.Option("--steps")] = 25,
    guidance: Annotated[float, typer.Option("--guidance")] = 5.0,
    bounds: Annotated[bool, typer.Option("--bounds/--no-bounds", help="Include the lower/upper reference rows.")] = True,
    clip: Annotated[Optional[Path], typer.Option("--clip", help="Local CLIPModel folder (default on the world: the world's CLIP).")] = None,
    dino: Annotated[Optional[Path], typer.Option("--dino", help="Local DINO / DINOv2 folder.")] = None,
    face: Annotated[Optional[Path], typer.Option("--face", help="Local insightface model folder (default on the world: its identity embedder).")] = None,
    cache: Annotated[Path, typer.Option("--cache", help="Cache of concepts and generated images (reruns do no work twice).")] = Path(".limner-cache"),
    out: Annotated[Path, typer.Option("--out", help="Report folder: results.json, results.md, plots, index.html.")] = Path("eval-report"),
    html_prompts: Annotated[int, typer.Option("--html-prompts", help="Prompts per subject shown in index.html.")] = 8,
    html_images: Annotated[int, typer.Option("--html-images", help="Images per prompt and method shown in index.html.")] = 4,
    layout_steps: Annotated[Optional[int], typer.Option("--layout-steps", help="A concept's first K denoising steps follow the class prompt (the layout), the rest its own; default: the method's (Textual Inversion: a fifth), 0: off.")] = None,
    base: BaseOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Score methods with the DreamBench protocol (real subjects) or the world bench.

    --method takes METHOD or METHOD:key=value,... with method or training settings (e.g.
    dreambooth_lora:prior_preservation=none,max_steps=600)."""
    from limner.evaluation.protocol import LOWER, UPPER, EvalSettings, Row, run_eval
    from limner.evaluation.report import markdown_table, write_report
    from limner.evaluation.subjects import load_subjects

    def go():
        for flag, v in (("-n/--images-per-prompt", images), ("--prompts", prompts if prompts is not None else 1), ("--steps", steps)):
            if v < 1:
                raise LimnerError(f"{flag} must be at least 1, got {v}")
        subs = load_subjects(subjects, class_noun)
        world = all(s.world is not None for s in subs)
        rows = ([Row(LOWER)] + ([Row(UPPER)] if world else [])) if bounds else []
        rows += [Row.parse(m) for m in method or []] + [Row.for_concept(c) for c in concept or []]
        if not rows:
            raise LimnerError("nothing to evaluate: give --method or --concept, or keep --bounds")
        for r in rows:
            if r.method:
                from limner.methods import get_method

                get_method(r.method)  # fails early, naming the available methods
        enc = build_encoders(world, base, clip, dino, face, device)
        if layout_steps is not None and not 0 <= layout_steps < steps:
            raise LimnerError(f"--layout-steps {layout_steps} must be between 0 and --steps - 1 ({steps - 1})")
        settings = EvalSettings(images_per_prompt=images, seed=seed, steps=steps, guidance=guidance, max_prompts=prompts,
                                layout_steps=layout_steps)
        results = run_eval(rows, subs, enc, cache, settings, base=base, device=device)
        written = write_report(results, out, html_prompts, html_images)
        typer.echo(markdown_table(results))
        typer.echo(f"report: {written['html']} ({results['seconds']:.0f} s; cache hits {results['cache']['hits']}, "
                   f"misses {results['cache']['misses']})")

    run(go)


def build_encoders(world: bool, base: Optional[str], clip: Optional[Path], dino: Optional[Path], face: Optional[Path], device: str):
    from limner.evaluation.encoders import CLIPEncoder, DINOEncoder, InsightFaceEmbedder, WorldCLIP, WorldFaceEmbedder
    from limner.evaluation.protocol import Encoders
    from limner.models.loading import WORLD_BASE, WORLD_PROBES, resolve_device
    from limner.world.probes import Probes

    dev = str(resolve_device(device))
    if clip is None and not (world and base is None):
        raise LimnerError("scoring real images needs --clip PATH, a local CLIPModel folder (e.g. openai/clip-vit-large-patch14 "
                          "saved with save_pretrained)")
    clip_enc = CLIPEncoder(clip, dev) if clip else WorldCLIP(WORLD_BASE, dev)
    face_enc = InsightFaceEmbedder(face, dev) if face else (WorldFaceEmbedder(WORLD_PROBES) if world else None)
    return Encoders(clip=clip_enc, dino=DINOEncoder(dino, dev) if dino else None, face=face_enc,
                    probes=Probes(WORLD_PROBES) if world else None)


@app.command("bench")
def bench_cmd(
    method: Annotated[Optional[list[str]], typer.Option("--method", help="Methods to measure (repeatable): METHOD or METHOD:key=value,... "
                                                        "with method or trainer settings, e.g. dreambooth_lora:mixed_precision=fp16.")] = None,
    subject: Annotated[str, typer.Option("--subject", help="One subject (world:NAME or a folder).")] = "world:duo_ball",
    class_noun: Annotated[Optional[str], typer.Option("--class-noun", help="Class noun for a subject folder without subject.json.")] = None,
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

    def go():
        from limner.evaluation.subjects import load_subjects
        from limner.io import write_json_atomic, write_text_atomic
        from limner.methods import get_method

        for m in method or []:
            name = Row.parse(m).method
            if name is None:
                raise LimnerError(f"--method {m}: bench measures the lower bound first by itself; name methods to compare with it")
            get_method(name)
        if images < 1 or steps < 1:
            raise LimnerError("-n/--images and --steps must be at least 1")
        if len(load_subjects(subject, class_noun)) != 1:
            raise LimnerError(f"--subject {subject} holds several subjects; bench measures one")
        if out.exists() and not out.is_dir():
            raise LimnerError(f"--out {out} is a file; give a folder")
        records = run_bench([LOWER] + list(method or []), subject, base, device, images, steps, cache, class_noun)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "bench.json", records)
        write_text_atomic(out / "bench.md", markdown(records))
        typer.echo(markdown(records))

    run(go)


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
