"""The library folder the app works in: concepts (`concepts/NAME/`, each a `limner train` folder) and adapters
(`adapters/NAME/`, each a `limner pretrain` folder) on disk, with what the Library page shows of each and the
changes it makes (rename, delete, export), and the reference images a person uploads.

Every name a person types becomes a path only through `safe_name`, so nothing is written outside the library.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from limner.errors import LimnerError

CONCEPTS, ADAPTERS, UPLOADS = "concepts", "adapters", "references"
MANIFESTS = {CONCEPTS: "limner.json", ADAPTERS: "adapter.json"}
# what a concept folder holds only to resume its training: not part of the interoperable files an export gives
NOT_EXPORTED = ("checkpoints",)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")


@dataclass
class Entry:
    """A concept or adapter folder, with its manifest."""

    path: Path
    kind: str  # CONCEPTS or ADAPTERS
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        return f"{self.name} ({self.manifest.get('method', '?')})"


def safe_name(text: str) -> str:
    """A folder name from what a person typed: letters, digits, '.', '_' and '-', starting with a letter or digit;
    a LimnerError for anything else (a '/' or '..' would leave the library)."""
    name = text.strip()
    if not NAME.fullmatch(name) or ".." in name:
        raise LimnerError(
            f"name {text!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit, 80 at most)"
        )
    return name


def unique_name(folder: Path, wanted: str) -> str:
    """`wanted`, or `wanted-2`, `wanted-3`, ... : the first that is not taken in `folder`."""
    name, i = wanted, 1
    while (folder / name).exists():
        i += 1
        name = f"{wanted}-{i}"
    return name


def entries(library: Path) -> list[Entry]:
    """Every concept and adapter in the library, newest first. A folder without its manifest (a training that
    has not finished yet) is not listed."""
    found = []
    for kind, manifest in MANIFESTS.items():
        for folder in (Path(library) / kind).glob("*"):
            path = folder / manifest
            if not path.is_file():
                continue
            try:
                found.append(Entry(folder, kind, json.loads(path.read_text())))
            except json.JSONDecodeError:
                continue  # half-written by hand: the Library page skips it rather than failing
    return sorted(found, key=lambda e: (e.path / MANIFESTS[e.kind]).stat().st_mtime, reverse=True)


def find(library: Path, name: str) -> Entry:
    for e in entries(library):
        if e.name == name or e.label == name or str(e.path) == name:
            return e
    raise LimnerError(f"no concept or adapter {name!r} in {library}")


def summary(entry: Entry) -> dict[str, Any]:
    """What the Library page lists about a concept or adapter."""
    m = entry.manifest
    config = m.get("config", m.get("settings", {})) or {}
    return {
        "name": entry.name,
        "kind": entry.kind[:-1],
        "method": m.get("method"),
        "subject": m.get("subject"),
        "class noun": m.get("class_noun"),
        "tokens": ", ".join(m.get("tokens", [])),
        "base": m.get(
            "base_path", m.get("base", {}).get("path") if isinstance(m.get("base"), dict) else m.get("base")
        ),
        "base fingerprint": m.get("base_fingerprint"),
        "steps": m.get("steps"),
        "training time (s)": m.get("seconds"),
        "recipe": config.get("recipe"),
        "folder": str(entry.path),
    }


def card(entry: Entry) -> str:
    readme = entry.path / "README.md"
    return readme.read_text() if readme.exists() else f"# {entry.name}\n\n(no model card)"


def loss_plot(entry: Entry, out: Path) -> Path | None:
    """The training loss against the step, from the manifest's curve; None for a concept that trained nothing."""
    curve = entry.manifest.get("curve") or []
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")  # the server has no display
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{entry.name}: training loss")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def samples(entry: Entry) -> list[Path]:
    """The validation images training drew, and any samples the concept ships."""
    return sorted((entry.path / "validation").glob("*.png")) + sorted((entry.path / "samples").glob("*.png"))


def rename(entry: Entry, new_name: str) -> Path:
    """Moves the folder within its part of the library; a concept's model card names its folder, so it is
    written again."""
    from limner.concepts import write_model_card

    target = entry.path.parent / safe_name(new_name)
    if target.exists():
        raise LimnerError(f"{target.name} exists already in {entry.path.parent}; pick another name")
    entry.path.rename(target)
    if entry.kind == CONCEPTS:
        write_model_card(target, entry.manifest)
    return target


def delete(entry: Entry) -> None:
    shutil.rmtree(entry.path)


def export(entry: Entry, out_dir: Path) -> Path:
    """A zip of the folder's interoperable files (weights, manifest, model card, log), without the checkpoints
    that only a resumed training reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{entry.name}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(entry.path.rglob("*")):
            rel = f.relative_to(entry.path)
            if f.is_file() and rel.parts[0] not in NOT_EXPORTED:
                z.write(f, Path(entry.name) / rel)
    return path


def tokens(entry: Entry) -> list[str]:
    """The words a prompt uses to name the concept (what the Generate page offers)."""
    m = entry.manifest
    return [m["token"]] if m.get("token") else list(m.get("tokens", []))[:1]


def save_references(
    folder: Path, images: list[Path], captions: list[str] | None = None, masks: list[Path] | None = None
) -> Path:
    """Uploaded reference images as a subject folder `limner train --subject` reads: the images, a caption file
    beside each (where given) and masks/NAME.png (where given, matched by order)."""
    from PIL import Image

    from limner.evaluation.subjects import read_image

    if not images:
        raise LimnerError("upload at least one reference image, or pick a world-bench subject")
    # read as `limner train --subject FOLDER` reads a picture (upright by its EXIF orientation, transparency over
    # white, bombs and unreadable files refused), all before anything is written
    pictures = []
    for src in images:
        try:
            pictures.append(read_image(Path(src)))
        except LimnerError as e:
            raise LimnerError(f"upload {Path(src).name}: {e}") from e
    levels = [mask_level(Path(m)) for m in (masks or [])[: len(pictures)]]
    folder.mkdir(parents=True, exist_ok=True)
    captions = [c.strip() for c in captions or []]
    for i, picture in enumerate(pictures):
        stem = f"ref{i:02d}"
        Image.fromarray(picture).save(folder / f"{stem}.png")
        if i < len(captions) and captions[i]:
            (folder / f"{stem}.txt").write_text(captions[i] + "\n")
        if i < len(levels):
            (folder / "masks").mkdir(exist_ok=True)
            levels[i].save(folder / "masks" / f"{stem}.png")
    return folder


def mask_level(path: Path):
    """An uploaded mask as the greyscale picture `limner train` reads (white or opaque = the subject): its alpha
    where it has one, as the command line reads a mask; an unreadable file or a bomb is a LimnerError naming it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return (im.getchannel("A") if im.mode in ("RGBA", "LA") else im.convert("L")).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise LimnerError(f"upload {path.name} is not a readable mask image ({e}); upload a PNG mask") from e
