"""The encoder and identity families' template: pretrain an adapter once, then personalize by encoding.

    pretrain(base, data, out) -> adapter folder      hours, once per base (the shared training loop)
    encode(base, adapter, subject, out) -> concept   seconds per subject, no training
    personalize = encode with the adapter named by `adapter=` (or the method's shipped one for the base)
    concept_from_files(base, paths, out, ...)        `limner generate --image ref.png`: files read, checked, encoded

An adapter folder holds the weights in the method's official layout and `adapter.json`: method,
variant, base fingerprint, what it was trained on, steps, time, settings. A concept records its
adapter by fingerprint, and eval's cache key includes that fingerprint (`key_inputs`), so a concept
encoded with one adapter is never reused for another.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from limner.errors import LimnerError
from limner.io import write_json_atomic
from limner.methods.base import Capabilities, Method, Score
from limner.subject import Subject

if TYPE_CHECKING:
    from limner.models.loading import Base

ADAPTER_MANIFEST = "adapter.json"
CURVE_POINTS = 500  # an adapter.json keeps at most about this many points of the loss curve


def thin_curve(curve: list) -> list:
    """The loss curve an adapter.json keeps: about CURVE_POINTS evenly spaced points, always the last one."""
    return curve[:: max(1, len(curve) // CURVE_POINTS)][:-1] + curve[-1:]


def write_adapter_manifest(out: Path, method: str, base: Base, **fields: Any) -> dict:
    manifest = {"method": method, "base_fingerprint": base.fingerprint, "base_path": str(base.path)} | fields
    write_json_atomic(Path(out) / ADAPTER_MANIFEST, manifest)
    return manifest


def made_by_limner(adapter: Path) -> bool:
    """Whether `adapter` is a folder `limner pretrain` wrote (its adapter.json beside the weights), not a method's
    official download (a file, or a folder of the official files)."""
    return Path(adapter).is_dir() and (Path(adapter) / ADAPTER_MANIFEST).is_file()


def read_adapter_manifest(folder: Path) -> dict:
    path = Path(folder) / ADAPTER_MANIFEST
    if not path.exists():
        raise LimnerError(f"adapter {folder} has no {ADAPTER_MANIFEST}; give a folder that `limner pretrain` wrote")
    return json.loads(path.read_text())


def read_reference_files(paths: list[str | Path]) -> list:
    """Image files as uint8 RGB arrays; an unreadable one (corrupt, empty, not a picture) is an error naming it."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise LimnerError(f"reference image {path} does not exist")
        try:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise LimnerError(f"reference image {path} could not be read ({e}); give a PNG, JPEG or WebP") from e
    return images


def write_references(out: Path, images: dict[str, Any] | list) -> None:
    """The pictures a concept was encoded from, as PNGs in its references/ folder (00.png, 01.png ... for a
    list; the given names, without suffix, for a dict)."""
    from limner.images import write_png

    named = images if isinstance(images, dict) else {f"{i:02d}": im for i, im in enumerate(images)}
    (Path(out) / "references").mkdir(parents=True, exist_ok=True)
    for name, image in named.items():
        write_png(image, Path(out) / "references" / f"{name}.png")


def encoded_concept_manifest(
    method: str, base: Base, adapter: Path, subject: Subject, config: Any, started: float, /, **fields: Any
) -> dict:
    """What every encoded concept's limner.json says (method, subject, base, the adapter by fingerprint, the
    settings, seconds since `started`), with the method's own `fields` added or overriding."""
    import time
    from dataclasses import asdict

    return {
        "method": method,
        "subject": subject.name,
        "class_noun": subject.class_noun,
        "tokens": [],
        "base_fingerprint": base.fingerprint,
        "base_path": str(base.path),
        "steps": 0,
        "seconds": round(time.perf_counter() - started, 3),
        "config": asdict(config),
        "adapter": str(Path(adapter).resolve()),
        "adapter_fingerprint": adapter_fingerprint(Path(adapter)),
        "example_prompt": f"a {subject.class_noun} on the beach",
    } | fields


def write_concept_manifest(out: Path, manifest: dict) -> None:
    """limner.json (written last, atomically: a folder without it is no concept) and the model card."""
    from limner.concepts import MANIFEST, write_model_card

    write_json_atomic(Path(out) / MANIFEST, manifest)
    write_model_card(Path(out), manifest)


def encoded_with(concept: Path, manifest: dict) -> Path:
    """The adapter `concept` was encoded with, checked to be there and unchanged since (its embeddings mean
    nothing to another adapter)."""
    adapter = Path(manifest["adapter"])
    if not adapter.exists():
        raise LimnerError(
            f"concept {concept} was encoded with adapter {adapter}, which is gone; encode it again with an adapter "
            "at hand"
        )
    if adapter_fingerprint(adapter) != manifest["adapter_fingerprint"]:
        raise LimnerError(
            f"adapter {adapter} changed since concept {concept} was encoded with it (fingerprint "
            f"{manifest['adapter_fingerprint']}, now {adapter_fingerprint(adapter)}); encode it again"
        )
    return adapter


def adapter_fingerprint(folder: Path) -> str:
    """The adapter's weights and settings: not its logs or checkpoints."""
    from limner.models.loading import fingerprint

    return fingerprint(Path(folder), skip=("train_log.csv", "README.md", "checkpoints", "logs"))


class AdapterMethod(Method):
    capabilities = Capabilities(needs_adapter=True)
    # settings a concept of this method takes per generation, overriding what it recorded (`limner generate
    # --ip-scale` sets "scale"): see `set_call_settings`
    call_settings: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def pretrain(self, base: Base, data: Any, out: Path, **settings: Any) -> Path:
        """Trains the method's adapter on many subjects; writes an adapter folder and returns it."""

    @abstractmethod
    def encode(self, base: Base, adapter: Path, subject: Subject, out: Path, **settings: Any) -> Path:
        """Encodes the subject's references with the adapter into a concept folder (seconds, no training)."""

    def default_adapter(self, base: Base) -> Path | None:
        """The adapter limner ships for this base: the world's, where this install has it; None for a real base."""
        from limner.models.loading import WORLD_BASE

        world = base.is_world or Path(base.path).resolve() == WORLD_BASE.resolve()
        return self.shipped_adapter({}) if world else None

    # the official checkpoint a user may give with --adapter instead of a limner folder (named in the error when no
    # adapter is found); methods that set it check such a file in `check_official_adapter`
    official_adapter: ClassVar[str | None] = None

    def check_official_adapter(self, path: Path) -> None:
        """An official checkpoint given as the adapter: its files there and readable (raises a LimnerError)."""
        read_adapter_manifest(path)

    def adapter_for(self, base: Base, adapter: str | Path | None) -> Path:
        folder = Path(adapter).expanduser() if adapter is not None else self.default_adapter(base)
        if folder is None and self.official_adapter is not None:
            raise LimnerError(
                f"{self.name} needs a pretrained adapter for this base ({base.path}): pretrain one with `limner "
                f"pretrain --method {self.name} --data world --out DIR`, or give {self.official_adapter} with "
                "--adapter FILE"
            )
        if folder is None:
            raise LimnerError(
                f"{self.name} needs a pretrained adapter for this base: pass --set adapter=DIR (a folder that "
                f"`limner pretrain --method {self.name}` wrote, or the method's official files)"
            )
        if self.official_adapter is not None and not made_by_limner(folder):
            self.check_official_adapter(folder)
            return folder
        manifest = read_adapter_manifest(folder)
        if manifest.get("method") != self.name:
            raise LimnerError(f"adapter {folder} is a {manifest.get('method')} adapter, not {self.name}'s")
        if manifest.get("base_fingerprint") not in (None, base.fingerprint):
            raise LimnerError(
                f"adapter {folder} was pretrained on base {manifest['base_fingerprint']} but the loaded base is "
                f"{base.fingerprint} ({base.path}); pretrain one for this base"
            )
        return folder

    def personalize(
        self,
        base: Base,
        subject: Subject | list[Subject],
        out: Path,
        *,
        score: Score | None = None,
        adapter: str | Path | None = None,
        **overrides: Any,
    ) -> Path:
        if isinstance(subject, (list, tuple)):
            if len(subject) != 1:
                raise LimnerError(f"{self.name} encodes one subject per concept, got {len(subject)}")
            (subject,) = subject
        return self.encode(base, self.adapter_for(base, adapter), subject, Path(out), **overrides)

    def concept_from_files(
        self,
        base: Base,
        paths: list[str | Path],
        out: Path,
        *,
        class_noun: str,
        adapter: str | Path | None = None,
        name: str | None = None,
        **settings: Any,
    ) -> Path:
        """A concept folder from reference image files (`limner generate --image ref.png`): read, checked,
        encoded with `adapter` (or the method's shipped one for the base)."""
        default_name = Path(paths[0]).stem if paths else "subject"
        subject = Subject(name or default_name, class_noun, read_reference_files(paths))
        return self.personalize(base, subject, Path(out), adapter=adapter, **settings)

    def set_call_settings(self, base: Base, concepts: list[Path], settings: dict[str, Any]) -> None:
        """Overrides, for the generations to come, settings the installed `concepts` recorded (those named in
        `call_settings`); the installation's undo puts everything back."""
        unknown = sorted(set(settings) - set(self.call_settings))
        if unknown:
            raise LimnerError(f"{self.name} concepts take no per-call setting {', '.join(unknown)}")

    def shipped_adapter(self, settings: dict) -> Path | None:
        """The adapter limner ships for the world base for these settings (assets/world/adapters/NAME/), where
        this install has it."""
        from limner.models import loading

        folder = loading.ASSETS / "world" / "adapters" / self.shipped_folder(settings)
        return folder if (folder / ADAPTER_MANIFEST).is_file() else None

    def shipped_folder(self, settings: dict) -> str:
        """The shipped adapter's folder name for these settings (a method with variants names one per variant)."""
        return self.name

    def key_inputs(self, overrides: dict) -> dict:
        # no adapter named: the shipped one, so a concept encoded with it is not reused once it is pretrained again
        adapter = overrides.get("adapter") or self.shipped_adapter(overrides)
        return {"adapter": adapter_fingerprint(Path(adapter))} if adapter is not None else {}


def started_from(init: str | None, out: Path) -> dict | None:
    """What a continued pretraining into `out` starts from, for its adapter.json: the adapter by fingerprint, and
    where that was itself pretrained by limner, its steps, times, seed and settings, and what it started from in turn
    (so the record names every stage that made the weights); an official file: its path and fingerprint. Taken
    before the first step, as the weights it names are then; `init` may not be `out` itself, whose weights the
    run replaces."""
    if init is None:
        return None
    where = Path(init).expanduser()
    if where.resolve().is_relative_to(Path(out).resolve()):
        raise LimnerError(f"init={init} lies in --out {out}, which this run writes over; give another --out")
    record = {"path": str(where), "fingerprint": adapter_fingerprint(where)}
    if made_by_limner(where):
        manifest = read_adapter_manifest(where)
        kept = ("steps", "seconds", "wall_seconds", "settings", "train", "started_from")
        record |= {k: manifest.get(k) for k in kept}
    return record
