"""Where eval subjects come from: the world bench, or folders of a user's own reference images.

A real subject is a folder of images (png, jpg, jpeg, webp) and, optionally, `subject.json` with
{"class_noun": "dog", "live": true}. A text file beside an image (dog1.jpg + dog1.txt, "on a sofa")
captions what else that picture shows: tuning methods append it to the image's training prompt.
`--subjects` takes one such folder, a folder of them, or a JSON manifest
[{"name": ..., "path": ..., "class_noun": ...}, ...].
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from limner.errors import LimnerError
from limner.io import IMAGE_SUFFIXES
from limner.subject import Subject
from limner.world.bench import (
    IDENTITIES,
    SUBJECTS,
    BenchPrompt,
    identity_prompts,
    identity_references,
    object_prompts,
    subject_references,
)
from limner.world.vocab import CONTEXTS

# DreamBench's prompt lists (DreamBooth paper, dataset/prompts_and_classes.txt); "{}" is the subject.
DREAMBENCH_OBJECT = [
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
]
DREAMBENCH_LIVE = DREAMBENCH_OBJECT[:10] + [
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
]
_RECONTEXT = 20  # DreamBench: the first prompts recontextualise, the rest accessorise / change properties


def dreambench_prompts(live: bool) -> list[BenchPrompt]:
    templates = DREAMBENCH_LIVE if live else DREAMBENCH_OBJECT
    kinds = (
        ["recontextualisation"] * (10 if live else _RECONTEXT)
        + (["accessorisation"] * 10 if live else [])
        + ["property"] * 5
    )
    return [BenchPrompt(t, k) for t, k in zip(templates, kinds, strict=True)]


@dataclass
class EvalSubject(Subject):
    kind: str = "object"  # object | identity
    prompts: list[BenchPrompt] = field(default_factory=list)
    world: object | None = None  # the world Subject / BenchIdentity, for ground-truth measures

    def fingerprint(self, masks: bool = False) -> str:
        """What training reads of this subject. `masks`: its masks too, for a method that reads them
        (a masked loss); left out otherwise, so keys of concepts trained without masks stay as they were."""
        h = hashlib.sha256(self.class_noun.encode())
        for im in self.images:
            h.update(np.ascontiguousarray(im).tobytes())
        for caption in self.captions or []:
            h.update(caption.encode())
        for mask in (self.masks or []) if masks else []:
            h.update(np.ascontiguousarray(mask).tobytes())
        return h.hexdigest()[:16]


def _world_object(s) -> EvalSubject:
    refs = subject_references(s)
    return EvalSubject(
        s.name,
        s.cls,
        [r.image for r in refs],
        [r.entities[0].mask for r in refs],
        kind="object",
        prompts=object_prompts(),
        world=s,
        meta={"contexts": [r.context for r in refs]},
        captions=[CONTEXTS[r.context] for r in refs],
    )


def _world_identity(b) -> EvalSubject:
    refs = identity_references(b)
    return EvalSubject(
        b.name,
        b.cls,
        [r.image for r in refs],
        [r.entities[0].mask for r in refs],
        kind="identity",
        prompts=identity_prompts(),
        world=b,
        meta={"contexts": [r.context for r in refs]},
        captions=[CONTEXTS[r.context] for r in refs],
    )


def world_subjects(spec: str) -> list[EvalSubject]:
    """'world', 'world:objects', 'world:identities' or 'world:name1,name2'."""
    part = spec.split(":", 1)[1] if ":" in spec else "all"
    makers = {s.name: (_world_object, s) for s in SUBJECTS} | {b.name: (_world_identity, b) for b in IDENTITIES}
    if part == "all":
        wanted = list(makers)
    elif part == "objects":
        wanted = [s.name for s in SUBJECTS]
    elif part == "identities":
        wanted = [b.name for b in IDENTITIES]
    else:
        wanted = [n.strip() for n in part.split(",") if n.strip()]
    missing = [n for n in wanted if n not in makers]
    if missing or not wanted:
        raise LimnerError(
            f"--subjects {spec}: unknown world subject(s) {', '.join(missing) or '(none given)'}; known: objects, "
            "identities, " + ", ".join(makers)
        )
    return [makers[n][0](makers[n][1]) for n in wanted]


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LimnerError(
            f"subject folder {folder} has no images (png, jpg, jpeg, webp, bmp); put the subject's reference images "
            "there"
        )
    return files


def load_captions(folder: Path) -> list[str] | None:
    """Each image's caption from the .txt file beside it ("" where there is none); None if no image has one."""
    texts = [f.with_suffix(".txt") for f in image_files(folder)]
    if not any(t.exists() for t in texts):
        return None
    return [" ".join(caption_text(t).split()) if t.exists() else "" for t in texts]


def caption_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LimnerError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save the caption as UTF-8") from e


def load_images(folder: Path) -> list[np.ndarray]:
    """RGB uint8 arrays of every image in a folder, EXIF orientation applied. Unreadable files are
    an error naming the file."""
    return [read_image(f) for f in image_files(folder)]


# pixels: a reference smaller than this shows no subject (a 1-pixel picture trained a concept of one colour)
MIN_SIDE = 16


def read_image(path: Path) -> np.ndarray:
    """One reference picture as the subject's RGB uint8 array (upright by its EXIF orientation, see to_rgb8); a file
    that is no picture, a decompression bomb (PIL refuses to decode one) or a picture too small to show anything is
    a LimnerError naming it."""
    try:
        with Image.open(path) as im:
            image = to_rgb8(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as e:
        raise LimnerError(f"{path} is too large to decode safely ({e.args[0].split(',')[0]}); resize it") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise LimnerError(f"{path} is not a readable image ({e}); remove or replace it") from e
    if min(image.shape[:2]) < MIN_SIDE:
        raise LimnerError(
            f"{path} is {image.shape[1]}x{image.shape[0]} pixels; a reference image needs at least {MIN_SIDE} on each "
            "side to show its subject"
        )
    return image


def load_masks(folder: Path, images: list[np.ndarray]) -> list[np.ndarray] | None:
    """Where the subject is in each reference image, from masks/NAME.png beside NAME.jpg (white or
    opaque = subject); None without a masks folder. A mask missing or of another size is an error."""
    mask_dir = folder / "masks"
    if not mask_dir.is_dir():
        return None
    masks = []
    for f, image in zip(image_files(folder), images):
        found = [m for m in sorted(mask_dir.glob(f"{f.stem}.*")) if m.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise LimnerError(
                f"{mask_dir} has no mask for {f.name}: add {mask_dir / f.stem}.png (white where the subject is), "
                "or remove the masks folder"
            )
        try:
            with Image.open(found[0]) as im:
                im = ImageOps.exif_transpose(im)
                level = im.getchannel("A") if im.mode in ("RGBA", "LA") else im.convert("L")
                mask = np.asarray(level) > 127
        except (OSError, SyntaxError, ValueError) as e:
            raise LimnerError(f"{found[0]} is not a readable mask image ({e}); remove or replace it") from e
        if mask.shape != image.shape[:2]:
            raise LimnerError(
                f"{found[0]} is {mask.shape[1]}x{mask.shape[0]} but {f.name} is {image.shape[1]}x{image.shape[0]}; "
                "a mask must be the size of its image"
            )
        masks.append(mask)
    return masks


def to_rgb8(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> RGB uint8: 16- and 32-bit greyscale scaled down (not clipped), transparency
    composited over white (not over whatever colour hides under alpha 0)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def folder_subject(folder: Path, class_noun: str | None = None, name: str | None = None) -> EvalSubject:
    meta_path = folder / "subject.json"
    if not folder.is_dir():
        raise LimnerError(f"subject folder {folder} does not exist or is not a folder")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    except ValueError as e:  # not JSON, or not UTF-8 text
        raise LimnerError(f'{meta_path} is not valid JSON ({e}); it should look like {{"class_noun": "dog"}}') from e
    if not isinstance(meta, dict):
        raise LimnerError(
            f'{meta_path} holds a JSON {type(meta).__name__}; it should look like {{"class_noun": "dog"}}'
        )
    noun = class_noun or meta.get("class_noun")
    if not noun:
        raise LimnerError(
            f"subject folder {folder} has no class noun: add subject.json with "
            '{"class_noun": "dog"} or pass --class-noun'
        )
    live = bool(meta.get("live", False))
    kind = meta.get("kind", "object")
    if kind not in ("object", "identity"):
        raise LimnerError(f"{meta_path}: kind must be 'object' or 'identity', got {kind!r}")
    images = load_images(folder)
    return EvalSubject(
        name or meta.get("name", folder.name),
        noun,
        images,
        load_masks(folder, images),
        kind=kind,
        prompts=dreambench_prompts(live),
        meta={"path": str(folder), "live": live},
        captions=load_captions(folder),
    )


def load_subjects(spec: str, class_noun: str | None = None) -> list[EvalSubject]:
    if spec == "world" or spec.startswith("world:"):
        return world_subjects(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise LimnerError(
            f"--subjects {path} does not exist; give a folder of reference images, a folder of such folders, "
            "a JSON manifest, or world[:objects|:identities]"
        )
    if path.is_file():
        if path.suffix != ".json":
            raise LimnerError(
                f'--subjects {path}: a file must be a JSON manifest [{{"name", "path", "class_noun"}}, ...]'
            )
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # not JSON, or not UTF-8 text
            raise LimnerError(f"--subjects {path} is not valid JSON ({e})") from e
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) for e in entries
        ):
            raise LimnerError(
                f'--subjects {path}: a manifest is a list of {{"path": ..., "class_noun": ..., "name": ...}} entries'
            )
        return [
            folder_subject((path.parent / e["path"]).resolve(), e.get("class_noun"), e.get("name")) for e in entries
        ]
    subfolders = sorted(p for p in path.iterdir() if p.is_dir())
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()) or not subfolders:
        return [folder_subject(path, class_noun)]
    return [folder_subject(p, class_noun) for p in subfolders]
