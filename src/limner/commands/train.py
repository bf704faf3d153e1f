"""`limner train`: personalize a base on a subject; writes a concept folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from limner.commands.options import (
    BaseOpt,
    DeviceOpt,
    FacesOpt,
    MixedPrecisionOpt,
    ResumeOpt,
    SeedOpt,
    check_concept_output,
    command,
    faces_setting,
    removed_if_failed,
)
from limner.errors import LimnerError

TRAINER_FLAGS = {
    "steps": "--steps",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "mixed_precision": "--mixed-precision",
    "resume": "--resume",
}


def check_encoder_options(method, adapter: str | None, allow_pickle: bool, **trainer_flags) -> None:
    """--adapter and --allow-pickle are for methods that encode with a pretrained adapter; the trainer's flags for
    methods that train (an encoder method given them would ignore them silently)."""
    from limner.methods.adapter import AdapterMethod

    encodes = isinstance(method, AdapterMethod)
    if not encodes and (adapter is not None or allow_pickle):
        flag = "--adapter" if adapter is not None else "--allow-pickle"
        raise LimnerError(f"{flag}: {method.name} trains on the subject and reads no pretrained adapter")
    if encodes and method.default_train_config() is None:
        given = [TRAINER_FLAGS[k] for k, v in trainer_flags.items() if v is not None]
        if given:
            raise LimnerError(
                f"{', '.join(given)}: {method.name} does not train on the subject, it encodes the references with "
                f"its pretrained adapter (seconds); trainer settings go to `limner pretrain --method {method.name}`"
            )


def folder_token(method, out: Path, settings: list[str], num_subjects: int) -> str | None:
    """The token a concept gets when --token is left out: its folder's name as a new pseudo-word (`<rex>` for
    --out concepts/rex), so two concepts trained with the defaults compose instead of both being `<s*>`. Only
    for methods whose own default is such a pseudo-word (DreamBooth's `sks` is a rare word on purpose)."""
    name = method.token_setting
    if name is None or num_subjects > 1 or any(item.split("=", 1)[0].strip() == name for item in settings):
        return None
    default = getattr(method.default_config(), name)
    slug = "-".join("".join(c if c.isalnum() else " " for c in out.resolve().name.lower()).split())[:30]
    return f"<{slug}>" if slug and isinstance(default, str) and default.startswith("<") else None


def skipped_files(subjects) -> dict[Path, list[str]]:
    """Per subject folder, the files limner does not read: neither an image, nor an image's caption (NAME.txt),
    nor subject.json. Counted and named, so a reference in a format limner skips (.heic, .tiff) is not lost unseen."""
    from limner.io import IMAGE_SUFFIXES

    skipped = {}
    for sub in subjects:
        folder = Path(sub.meta["path"]) if sub.meta.get("path") else None
        if folder is None:
            continue  # a world subject
        files = [p for p in folder.iterdir() if p.is_file()]
        stems = {p.stem for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
        names = sorted(
            p.name
            for p in files
            if p.suffix.lower() not in IMAGE_SUFFIXES
            and not (p.suffix == ".txt" and p.stem in stems)
            and p.name != "subject.json"
        )
        if names:
            skipped[folder] = names
    return skipped


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
    mixed_precision: MixedPrecisionOpt = None,
    resume: ResumeOpt = None,
    seed: SeedOpt = None,
    setting: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set",
            help="A method setting KEY=VALUE (repeatable), "
            "or trainer setting, e.g. --set prior_preservation=none --set checkpoint_every=50.",
        ),
    ] = None,
    adapter: Annotated[
        Optional[str],
        typer.Option(
            "--adapter",
            help="Encoder methods: the pretrained adapter to encode with (a `limner pretrain` folder or an official "
            "file). Default: the one limner ships for the world base.",
        ),
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Encoder methods: read a pickled .bin adapter (weights_only).")
    ] = False,
    faces: FacesOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Train again into an --out that holds a concept or an interrupted run (its checkpoints go; its "
            "weights are replaced when the new ones are written).",
        ),
    ] = False,
    base: BaseOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Personalize a base on a subject's reference images; writes a concept folder."""
    from limner.concepts import MANIFEST, read_manifest, remove_stale_files
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
    check_encoder_options(
        m,
        adapter,
        allow_pickle,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        mixed_precision=mixed_precision,
        resume=resume,
    )
    overrides = command_line_settings(
        m,
        setting or [],
        len(subs),
        token if token is not None else folder_token(m, out, setting or [], len(subs)),
        num_vectors,
        max_steps=steps,
        learning_rate=lr,
        batch_size=batch_size,
        mixed_precision=mixed_precision,
        resume=resume,
        seed=seed,
    )
    check_concept_output(out, resume, force)  # after the settings: what is wrong with the command comes first
    for folder, names in skipped_files(subs).items():
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        typer.echo(f"note: skipped {len(names)} file(s) in {folder} that are not images: {shown}", err=True)
    if adapter is not None:
        overrides["adapter"] = adapter
    if allow_pickle:
        overrides["allow_pickle"] = True
    overrides |= faces_setting(m, faces)
    b = load_base(base, device=device, dtype="fp32")  # trainable weights stay fp32; --mixed-precision speeds it up
    previous = read_manifest(out) if (out / MANIFEST).is_file() else {}
    if force and not resume and (out / "checkpoints").is_dir() and is_main_process():
        shutil.rmtree(out / "checkpoints")  # a new run from step 0: the old run's would outrank its own
    with removed_if_failed(out):
        folder = m.personalize(b, subs if len(subs) > 1 else subs[0], out, **overrides)
    finish_processes()
    if is_main_process():
        if previous:
            remove_stale_files(folder, previous, read_manifest(folder))
        typer.echo(f"concept written to {folder}")
