"""`limner pretrain`: pretrain an encoder (or identity) method's adapter once per base; writes an adapter folder.

Runs under `accelerate launch` as `limner train` does: every process trains its shard of the data, the main
process writes the adapter. `--from ADAPTER` runs again what an adapter's `adapter.json` recorded (method,
settings, data, steps, seed, base), so a shipped adapter can be reproduced anywhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from limner.commands.options import (
    BaseOpt,
    DeviceOpt,
    FacesOpt,
    MixedPrecisionOpt,
    ResumeOpt,
    SeedOpt,
    command,
    faces_setting,
    output_folder,
    removed_if_failed,
)
from limner.errors import LimnerError

# what --from reruns of the trainer's recorded settings: everything but where the run resumed from
NOT_REPRODUCED = ("resume",)


def encoder_method(name: str, what: str = "limner pretrain") -> Any:
    """The method called `name`, which must encode subjects with a pretrained adapter; a tuning method is a clear
    error saying how it personalizes instead."""
    from limner.methods import get_method, method_names
    from limner.methods.adapter import AdapterMethod

    method = get_method(name)
    if not isinstance(method, AdapterMethod):
        encoders = [n for n in method_names() if isinstance(get_method(n), AdapterMethod)]
        raise LimnerError(
            f"{what} --method {name}: {name} is a {method.family} method, which trains on each subject: "
            f"`limner train --method {name} --subject FOLDER --out C`, then `limner generate --concept C`. {what} "
            f"is for the methods that pretrain an adapter once and encode references with it: "
            f"{', '.join(encoders) or 'none installed'}"
        )
    return method


def adapter_size(out: Path) -> int:
    """Bytes of the adapter itself: its files, not the checkpoints and logs beside them."""
    skip = {"checkpoints", "logs", "train_log.csv"}
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not skip & set(p.relative_to(out).parts))


def steps_text(steps: int | None) -> str | None:
    return None if steps is None else f"{steps} step{'' if steps == 1 else 's'}"


def human_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def from_adapter(folder: Path) -> tuple[str, str, dict, str | None, str | None]:
    """(method, data spec, settings, base, its fingerprint) recorded in an adapter folder's adapter.json."""
    from limner.methods.adapter import ADAPTER_MANIFEST, read_adapter_manifest
    from limner.models.loading import WORLD_BASE

    if not (folder / ADAPTER_MANIFEST).is_file():
        raise LimnerError(
            f"--from {folder}: no {ADAPTER_MANIFEST} there; give an adapter folder that `limner pretrain` wrote"
        )
    try:
        manifest = read_adapter_manifest(folder)
    except ValueError as e:
        raise LimnerError(f"--from {folder}: {ADAPTER_MANIFEST} is not valid JSON ({e})") from e
    missing = [k for k in ("method", "data", "settings", "train") if k not in manifest]
    if missing:
        raise LimnerError(f"--from {folder}: {ADAPTER_MANIFEST} does not record {', '.join(missing)}")
    data = manifest["data"]
    if not isinstance(data, dict) or data.get("kind") is None:
        raise LimnerError(
            f"--from {folder}: it was pretrained on data limner cannot open again ({data!r}: a stream given in "
            "Python); pretrain it with --data world|FOLDER|DATASET|SHARDS"
        )
    spec = "world" if data["kind"] == "world" else data.get("path")
    if spec != "world" and (spec is None or not Path(spec).exists()):
        raise LimnerError(
            f"--from {folder}: it was pretrained on {data['kind']} data {spec}, which is not here; give the same "
            "data with --data"
        )
    settings = {k: v for k, v in manifest["settings"].items() if v is not None}
    # an image encoder the base lacks travelled with the adapter: take that copy where the recorded path is gone
    encoder = settings.get("image_encoder")
    if encoder is not None and not Path(encoder).exists() and (folder / "image_encoder").is_dir():
        settings["image_encoder"] = str(folder / "image_encoder")
    train = {k: v for k, v in manifest["train"].items() if k not in NOT_REPRODUCED}
    base_path = manifest.get("base_path")
    base = None if base_path is None or Path(base_path).resolve() == WORLD_BASE.resolve() else base_path
    return manifest["method"], spec, settings | train, base, manifest.get("base_fingerprint")


@command
def pretrain_cmd(
    out: Annotated[Path, typer.Option("--out", help="The adapter folder to write.")],
    method: Annotated[
        Optional[str], typer.Option("--method", help="An encoder or identity method (see `limner methods`).")
    ] = None,
    data: Annotated[
        Optional[str],
        typer.Option(
            "--data",
            help="world (the procedural world's endless stream), an image folder with metadata.jsonl, a datasets "
            "dataset saved with save_to_disk, parquet files or webdataset .tar shards.",
        ),
    ] = None,
    from_adapter_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--from",
            help="An adapter folder: run again what its adapter.json recorded (method, settings, data, steps, "
            "seed, base); options given beside it win.",
        ),
    ] = None,
    steps: Annotated[Optional[int], typer.Option("--steps")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Per process.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    mixed_precision: MixedPrecisionOpt = None,
    resume: ResumeOpt = None,
    seed: SeedOpt = None,
    setting: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set",
            help="A method or trainer setting KEY=VALUE (repeatable), e.g. --set variant=plus --set "
            "checkpoint_every=500 (`limner methods NAME` lists them).",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Pretrain again from step 0 into an --out that already holds a finished adapter (its checkpoints "
            "go; the adapter stays until the new one is written).",
        ),
    ] = False,
    faces: FacesOpt = None,
    base: BaseOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Pretrain an encoder method's adapter on many subjects (once per base); writes an adapter folder."""
    from limner.methods.adapter import ADAPTER_MANIFEST, read_adapter_manifest
    from limner.methods.settings import parse_setting
    from limner.models.loading import load_base
    from limner.training import finish_processes, is_main_process

    if mixed_precision not in (None, "no", "fp16", "bf16"):
        raise LimnerError(f"--mixed-precision {mixed_precision!r}: use no, fp16 or bf16")
    for flag, value in (("--steps", steps), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise LimnerError(f"{flag} must be at least 1, got {value}")
    if lr is not None and lr <= 0:
        raise LimnerError(f"--lr must be positive, got {lr}")
    recorded: dict = {}
    fingerprint = None
    if from_adapter_dir is not None:
        recorded_method, recorded_data, recorded, recorded_base, fingerprint = from_adapter(from_adapter_dir)
        if method is not None and method != recorded_method:
            raise LimnerError(f"--method {method}: --from {from_adapter_dir} is a {recorded_method} adapter")
        method, data = method or recorded_method, data or recorded_data
        if base is None:
            base = recorded_base
        else:
            fingerprint = None  # another base on purpose: what was recorded is a recipe, not a check
    if method is None:
        raise LimnerError("--method: name the method whose adapter to pretrain (or give --from ADAPTER_DIR)")
    if data is None:
        raise LimnerError("--data: give world, an image folder with metadata.jsonl, a saved dataset or tar shards")
    m = encoder_method(method)
    output_folder(out)
    if (out / ADAPTER_MANIFEST).is_file() and not (resume or force):
        done = read_adapter_manifest(out)
        raise LimnerError(
            f"--out {out} already holds a finished {done.get('method')} adapter ({done.get('steps')} steps); "
            "nothing was overwritten. Continue it with --resume latest (and more --steps), pretrain again with "
            "--force, or choose another --out"
        )
    settings = recorded | dict(parse_setting(item, "--set") for item in setting or [])
    flags = {
        "max_steps": steps,
        "batch_size": batch_size,
        "learning_rate": lr,
        "mixed_precision": mixed_precision,
        "resume": resume,
        "seed": seed,
    }
    settings |= {k: v for k, v in flags.items() if v is not None} | faces_setting(m, faces)
    b = load_base(base, device=device, dtype="fp32")  # trainable weights stay fp32; --mixed-precision speeds it up
    if fingerprint is not None and b.fingerprint != fingerprint:
        raise LimnerError(
            f"--from {from_adapter_dir} was pretrained on base {fingerprint}, but {b.path} is {b.fingerprint}; give "
            "that base with --base (or another one on purpose: it is then a new adapter, not a reproduction)"
        )
    if force and not resume and (out / "checkpoints").is_dir() and is_main_process():
        # a new run from step 0: the old run's checkpoints would outrank its own (newest step kept, resumed from)
        shutil.rmtree(out / "checkpoints")
    with removed_if_failed(out):  # nothing half-written: a folder this run made goes if no checkpoint is left
        folder = Path(m.pretrain(b, data, out, **settings))
    finish_processes()
    if is_main_process():
        manifest = read_adapter_manifest(folder) if (folder / ADAPTER_MANIFEST).is_file() else {}
        what = ", ".join(
            str(x) for x in (manifest.get("method"), manifest.get("variant"), steps_text(manifest.get("steps"))) if x
        )
        typer.echo(f"adapter written to {folder} ({what}; {human_size(adapter_size(folder))})")
