"""Bad input across the CLI, the Python API and the app: each case expects a specific outcome (one line naming the
file or argument and exit code 2, a LimnerError from the API, or the picture read as a person would expect), and
checks that nothing already on disk changed: a base, a trained concept, earlier images and the reference folders
are hashed before and after every case."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from limner.cli import app
from limner.errors import LimnerError
from reliability.report import changes, tree_state

MISSING = "/nonexistent/base"


# ---------------------------------------------------------------------------------------------------------------
# the workspace: what a user already has on disk, which no bad input may change
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Workspace:
    root: Path  # everything below is hashed around each case
    base: Path  # the tiny base (a user's SD folder)
    concept: Path  # a Textual Inversion concept trained on it
    lora: Path  # a DreamBooth LoRA concept's weights file
    images: Path  # an earlier `limner generate` output
    refs: Path  # good reference images
    inputs: Path  # where each case puts its bad input

    def state(self) -> dict[str, str]:
        return tree_state(self.root)


def save_png(path: Path, array: np.ndarray, **kw) -> Path:
    Image.fromarray(array, **kw).save(path)
    return path


def picture(h=40, w=48, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_base) -> Workspace:
    from helpers import image_folder

    root = tmp_path_factory.mktemp("workspace")
    base = root / "base"
    shutil.copytree(tiny_base, base)
    refs = image_folder(root / "refs", n=3)
    concept, lora_out = root / "concept", root / "lora"
    train = ["train", "--subject", str(refs), "--class-noun", "ball", "--steps", "1", "--batch-size", "1"]
    for method, out in (("textual_inversion", concept), ("dreambooth_lora", lora_out)):
        extra = ["--set", "prior_preservation=none"] if method != "textual_inversion" else []
        r = CliRunner().invoke(app, [*train, "--method", method, "--base", str(base), "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
    images = root / "images"
    r = CliRunner().invoke(
        app, ["generate", "a ball", "-n", "1", "--steps", "1", "--base", str(base), "--out", str(images)]
    )
    assert r.exit_code == 0, r.output
    inputs = root / "inputs"
    inputs.mkdir()
    return Workspace(root, base, concept, lora_out / "pytorch_lora_weights.safetensors", images, refs, inputs)


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: each makes its input in the workspace (before the hashing) and returns the command or the call
# ---------------------------------------------------------------------------------------------------------------


def subject_folder(ws: Workspace, name: str, files: dict[str, bytes | np.ndarray | Image.Image]) -> Path:
    folder = ws.inputs / name
    folder.mkdir(exist_ok=True)
    for file, content in files.items():
        if isinstance(content, bytes):
            (folder / file).write_bytes(content)
        elif isinstance(content, Image.Image):
            content.save(folder / file)
        else:
            save_png(folder / file, content)
    return folder


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    """A 14000 x 14000 one-bit PNG: 24 KB on disk, 196 million pixels (more than twice PIL's limit) decoded."""
    buf = io.BytesIO()
    Image.new("1", (14000, 14000)).save(buf, format="PNG")
    return buf.getvalue()


def train_cmd(ws: Workspace, subject: Path | str, *extra: str, method="textual_inversion", base=None) -> list[str]:
    return [
        "train",
        "--method",
        method,
        "--subject",
        str(subject),
        "--class-noun",
        "ball",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--out",
        str(ws.root / "new-concept"),
        "--base",
        str(base or ws.base),
        *extra,
    ]


def gen_cmd(ws: Workspace, *extra: str, prompt="a ball", base=None) -> list[str]:
    return [
        "generate",
        prompt,
        "-n",
        "1",
        "--steps",
        "1",
        "--out",
        str(ws.root / "new-images"),
        "--base",
        str(base or ws.base),
        *extra,
    ]


def partial_base(ws: Workspace, name: str, damage: Callable[[Path], None]) -> Path:
    folder = ws.inputs / name
    shutil.copytree(ws.base, folder)
    damage(folder)
    return folder


def truncated_copy(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def other_method_concept(ws: Workspace) -> Path:
    """The Textual Inversion concept copied, its limner.json edited to say DreamBooth LoRA (files of one method,
    manifest of another)."""
    folder = ws.inputs / "mislabelled"
    shutil.copytree(ws.concept, folder)
    manifest = json.loads((folder / "limner.json").read_text())
    (folder / "limner.json").write_text(json.dumps(manifest | {"method": "dreambooth_lora"}))
    return folder


def pickle_embedding(ws: Workspace) -> Path:
    import torch

    path = ws.inputs / "embedding.pt"
    torch.save({"<x>": torch.zeros(32)}, path)
    return path


def foreign_safetensors(ws: Workspace) -> Path:
    """Bytes that start like a safetensors header and are something else."""
    path = ws.inputs / "foreign.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b'{"a": [1, 2, 3]}' + b"\0" * 10)
    return path


# (id, what is given, build(ws) -> the command line, what its one-line error must say, a note on the expectation)
CLI_CASES: list[tuple[str, str, Callable[[Workspace], list[str]], str, str]] = [
    # bases
    ("base-missing", "--base /nonexistent/base", lambda ws: gen_cmd(ws, base=MISSING), "does not exist", ""),
    (
        "base-empty",
        "--base an empty folder",
        lambda ws: gen_cmd(ws, base=mkdir(ws.inputs / "empty-base")),
        "is empty",
        "",
    ),
    (
        "base-no-unet",
        "--base a folder without unet/",
        lambda ws: gen_cmd(ws, base=partial_base(ws, "no-unet", lambda f: shutil.rmtree(f / "unet"))),
        "unet",
        "",
    ),
    (
        "base-bad-index",
        "--base with model_index.json cut short",
        lambda ws: gen_cmd(
            ws,
            base=partial_base(
                ws, "bad-index", lambda f: truncated_copy(f / "model_index.json", f / "model_index.json")
            ),
        ),
        "not valid JSON",
        "",
    ),
    (
        "base-truncated-unet",
        "--base whose UNet safetensors is cut in half",
        lambda ws: gen_cmd(
            ws,
            base=partial_base(
                ws,
                "cut-unet",
                lambda f: truncated_copy(
                    f / "unet/diffusion_pytorch_model.safetensors", f / "unet/diffusion_pytorch_model.safetensors"
                ),
            ),
        ),
        "truncated",
        "",
    ),
    ("base-not-a-model", "--base a folder of pictures", lambda ws: gen_cmd(ws, base=ws.refs), "model_index.json", ""),
    # unknown names
    ("unknown-scheduler", "--scheduler fast", lambda ws: gen_cmd(ws, "--scheduler", "fast"), "--scheduler", ""),
    (
        "unknown-method",
        "train --method nosuch",
        lambda ws: train_cmd(ws, ws.refs, method="nosuch"),
        "unknown method",
        "",
    ),
    (
        "unknown-setting",
        "train --set nosuch=1",
        lambda ws: train_cmd(ws, ws.refs, "--set", "nosuch=1"),
        "no setting 'nosuch'",
        "",
    ),
    (
        "unknown-concept-method",
        "a concept whose limner.json names method nosuch",
        lambda ws: gen_cmd(ws, "--concept", str(edited_manifest(ws, "nosuch"))),
        "unknown method",
        "",
    ),
    # bad values
    ("steps-negative", "generate --steps -1", lambda ws: gen_cmd(ws, "--steps", "-1"), "--steps", ""),
    ("images-zero", "generate -n 0", lambda ws: gen_cmd(ws, "-n", "0"), "--num-images", ""),
    ("height-not-8", "generate --height 100", lambda ws: gen_cmd(ws, "--height", "100"), "multiple of 8", ""),
    ("guidance-nan", "generate --guidance nan", lambda ws: gen_cmd(ws, "--guidance", "nan"), "--guidance", ""),
    ("seed-negative", "generate --seed -3", lambda ws: gen_cmd(ws, "--seed", "-3"), "--seed", ""),
    (
        "steps-wrong-type",
        "generate --steps two",
        lambda ws: gen_cmd(ws, "--steps", "two"),
        "--steps",
        "click's usage error",
    ),
    ("train-steps-zero", "train --steps 0", lambda ws: train_cmd(ws, ws.refs, "--steps", "0"), "--steps", ""),
    ("train-lr-negative", "train --lr -1", lambda ws: train_cmd(ws, ws.refs, "--lr", "-1"), "--lr", ""),
    (
        "set-wrong-type",
        "train --set num_vectors=two",
        lambda ws: train_cmd(ws, ws.refs, "--set", "num_vectors=two"),
        "num_vectors",
        "",
    ),
    ("set-bool-word", "train --set flip=maybe", lambda ws: train_cmd(ws, ws.refs, "--set", "flip=maybe"), "flip", ""),
    # subject folders
    (
        "subject-missing",
        "--subject a folder that does not exist",
        lambda ws: train_cmd(ws, ws.inputs / "nothere"),
        "does not exist",
        "",
    ),
    (
        "subject-no-images",
        "--subject a folder with notes.txt only",
        lambda ws: train_cmd(ws, subject_folder(ws, "no-images", {"notes.txt": b"hi"})),
        "has no images",
        "",
    ),
    (
        "subject-corrupt",
        "--subject with random bytes named a.png",
        lambda ws: train_cmd(ws, subject_folder(ws, "corrupt", {"a.png": os.urandom(500)})),
        "a.png is not a readable image",
        "",
    ),
    (
        "subject-truncated",
        "--subject with a PNG cut in half",
        lambda ws: train_cmd(ws, subject_folder(ws, "truncated", {"a.png": png_bytes(picture())[:700]})),
        "a.png is not a readable image",
        "",
    ),
    (
        "subject-1px",
        "--subject with a 1 x 1 pixel image",
        lambda ws: train_cmd(ws, subject_folder(ws, "one-pixel", {"a.png": picture(1, 1)})),
        "1x1",
        "",
    ),
    (
        "subject-bomb",
        "--subject with a decompression bomb (14000 x 14000 PNG, 24 KB)",
        lambda ws: train_cmd(ws, subject_folder(ws, "bomb", {"a.png": bomb_png()})),
        "pixels",
        "",
    ),
    (
        "subject-not-image-named-jpg",
        "--subject with a text file named photo.jpg",
        lambda ws: train_cmd(ws, subject_folder(ws, "text-jpg", {"photo.jpg": b"I am not a picture\n"})),
        "photo.jpg is not a readable image",
        "",
    ),
    # weight files
    (
        "concept-truncated",
        "--concept whose weights are cut short",
        lambda ws: gen_cmd(ws, "--concept", str(cut_concept(ws))),
        "damaged",
        "",
    ),
    (
        "embedding-foreign",
        "--embedding a foreign file with a .safetensors name",
        lambda ws: gen_cmd(ws, "--embedding", str(foreign_safetensors(ws))),
        "foreign.safetensors is damaged",
        "",
    ),
    (
        "embedding-unet",
        "--embedding the base's UNet weights",
        lambda ws: gen_cmd(ws, "--embedding", str(ws.base / "unet/diffusion_pytorch_model.safetensors")),
        "not a Textual Inversion embedding",
        "",
    ),
    (
        "embedding-lora",
        "--embedding a DreamBooth LoRA file (another method's)",
        lambda ws: gen_cmd(ws, "--embedding", str(ws.lora)),
        "not a Textual Inversion embedding",
        "",
    ),
    (
        "pickle-refused",
        "--embedding x.pt without --allow-pickle",
        lambda ws: gen_cmd(ws, "--embedding", str(pickle_embedding(ws))),
        "--allow-pickle",
        "",
    ),
    (
        "concept-other-base",
        "--concept trained on another base (the world base loaded)",
        lambda ws: [
            "generate",
            "a ball",
            "-n",
            "1",
            "--steps",
            "1",
            "--concept",
            str(ws.concept),
            "--out",
            str(ws.root / "new-images"),
        ],
        "was trained on base",
        "names both bases and --force",
    ),
    (
        "concept-other-method",
        "--concept whose limner.json names another method than its files",
        lambda ws: gen_cmd(ws, "--concept", str(other_method_concept(ws))),
        "mislabelled",
        "",
    ),
    (
        "concept-not-json",
        "--concept whose limner.json is not JSON",
        lambda ws: gen_cmd(ws, "--concept", str(edited_manifest(ws, None))),
        "not valid JSON",
        "",
    ),
    (
        "resume-other-method",
        "train --method dreambooth --resume latest into a Textual Inversion run",
        lambda ws: [
            "train",
            "--method",
            "dreambooth",
            "--subject",
            str(ws.refs),
            "--class-noun",
            "ball",
            "--steps",
            "3",
            "--base",
            str(ws.base),
            "--out",
            str(copied(ws, ws.concept, "resumed")),
            "--resume",
            "latest",
            "--set",
            "prior_preservation=none",
        ],
        "other settings",
        "",
    ),
    # paths
    (
        "token-traversal",
        "train --method custom_diffusion --token ../../x",
        lambda ws: train_cmd(ws, ws.refs, "--token", "../../x", method="custom_diffusion"),
        "--token",
        "",
    ),
    ("token-absolute", "train --token /tmp/x", lambda ws: train_cmd(ws, ws.refs, "--token", "/tmp/x"), "--token", ""),
    (
        "class-noun-traversal",
        "train --class-noun ../../x",
        lambda ws: train_cmd(ws, ws.refs, "--class-noun", "../../x", method="dreambooth"),
        "class noun",
        "",
    ),
    (
        "manifest-file-traversal",
        "--subject a manifest naming a subject ../../escape",
        lambda ws: train_cmd(ws, escaping_manifest(ws)),
        "subject's name",
        "",
    ),
    (
        "out-is-file",
        "generate --out an earlier record (a file)",
        lambda ws: out_at(gen_cmd(ws), next(ws.images.glob("*.json"))),
        "is a file",
        "",
    ),
    (
        "out-over-concept",
        "train --out an existing concept",
        lambda ws: out_at(train_cmd(ws, ws.refs), ws.concept),
        "already holds",
        "",
    ),
]


def out_at(args: list[str], out: Path) -> list[str]:
    """A command's arguments with its --out replaced."""
    i = args.index("--out")
    return [*args[: i + 1], str(out), *args[i + 2 :]]


def mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


def copied(ws: Workspace, src: Path, name: str) -> Path:
    dst = ws.inputs / name
    shutil.copytree(src, dst)
    return dst


def edited_manifest(ws: Workspace, method: str | None) -> Path:
    folder = ws.inputs / f"manifest-{method}"
    shutil.copytree(ws.concept, folder)
    if method is None:
        (folder / "limner.json").write_text("{oops")
    else:
        m = json.loads((folder / "limner.json").read_text())
        (folder / "limner.json").write_text(json.dumps(m | {"method": method}))
    return folder


def cut_concept(ws: Workspace) -> Path:
    folder = ws.inputs / "cut-concept"
    shutil.copytree(ws.concept, folder)
    for weights in folder.glob("*.safetensors"):
        truncated_copy(weights, weights, 0.9)
    return folder


def escaping_manifest(ws: Workspace) -> Path:
    path = ws.inputs / "subjects.json"
    path.write_text(json.dumps([{"name": "../../escape", "path": str(ws.refs), "class_noun": "ball"}]))
    return path


def said_line(lines: list[str]) -> str:
    """The line of a command's output that says what went wrong (click frames its usage errors in a box)."""
    found = [line.strip("│ ") for line in lines if line.startswith("error:") or "Invalid value" in line]
    return (found or lines or ["(nothing printed)"])[-1]


@pytest.mark.parametrize(("given", "build", "said", "note"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(ws, report, given, build, said, note):
    args = build(ws)
    before = ws.state()
    r = CliRunner().invoke(app, args)
    unchanged = changes(before, ws.state())
    lines = r.output.strip().splitlines()
    report.case(
        "bad input",
        "CLI",
        given,
        f"exit 2, one line saying '{said}'" + (f" ({note})" if note else ""),
        f"exit {r.exit_code}: {said_line(lines)}",
        unchanged,
    )
    assert r.exit_code == 2, r.output
    assert said in r.output and "Traceback" not in r.output
    if "usage" not in note:  # click's own usage errors are a framed block; limner's are one line
        assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert unchanged == "yes"


def test_files_that_are_not_images_are_a_counted_skip(ws, report, tmp_path):
    folder = subject_folder(ws, "with-extras", {"a.png": picture(), "a.txt": b"on the beach", "notes.md": b"x"})
    (folder / ".DS_Store").write_bytes(b"\0\0")
    (folder / "b.heic").write_bytes(b"\0\0")
    before = ws.state()
    r = CliRunner().invoke(app, out_at(train_cmd(ws, folder), tmp_path / "concept"))
    unchanged = changes(before, ws.state())
    notes = [line for line in r.output.splitlines() if line.startswith("note: skipped")]
    report.case(
        "bad input",
        "CLI",
        "--subject with a PNG and its caption, plus notes.md, .DS_Store and a .heic photo",
        "trained on the one image; one line counting and naming the 3 files skipped",
        f"exit {r.exit_code}: {notes[0] if notes else '(nothing said)'}",
        unchanged,
    )
    assert r.exit_code == 0 and len(notes) == 1, r.output
    assert "skipped 3 file(s)" in notes[0] and all(n in notes[0] for n in (".DS_Store", "b.heic", "notes.md"))
    assert unchanged == "yes"


# ---------------------------------------------------------------------------------------------------------------
# pictures that are unusual but valid: read as a person would expect, nothing refused
# ---------------------------------------------------------------------------------------------------------------


def exif_rotated_jpeg() -> bytes:
    """A 48 wide x 40 high JPEG whose EXIF orientation (6) says: turn it a quarter clockwise to view it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(picture()).save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (48, 40), (0, 255, 255, 0)).save(buf, format="JPEG")  # no cyan ink, full magenta+yellow: red
    return buf.getvalue()


def rgba_png() -> bytes:
    rgba = np.zeros((40, 48, 4), dtype=np.uint8)
    rgba[..., 1] = 255  # green where opaque
    rgba[:, :24, 3] = 255  # left half opaque, right half transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 48), 65535 // 2, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def grey_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 48), 200, dtype=np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


# (id, file name, bytes, expected in words, check of the one image read)
FORMAT_CASES = [
    ("16-bit", "a.png", png16, "read as 8-bit RGB, mid grey stays mid grey (127)", lambda im: (im == 127).all()),
    ("grayscale", "a.png", grey_png, "read as RGB with equal channels (200)", lambda im: (im == 200).all()),
    (
        "rgba",
        "a.png",
        rgba_png,
        "transparency composited over white: green left, white right",
        lambda im: (im[:, :24] == [0, 255, 0]).all() and (im[:, 24:] == 255).all(),
    ),
    ("cmyk", "a.jpg", cmyk_jpeg, "read as RGB (red)", lambda im: im[..., 0].mean() > 200 and im[..., 1].mean() < 60),
    (
        "exif-rotated",
        "a.jpg",
        exif_rotated_jpeg,
        "turned upright by its EXIF orientation: 40 wide x 48 high",
        lambda im: im.shape == (48, 40, 3),
    ),
]


@pytest.mark.parametrize(("kind", "name", "make", "expected", "check"), FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_unusual_pictures_are_read_as_a_person_sees_them(ws, report, kind, name, make, expected, check):
    from limner.evaluation.subjects import load_subjects

    folder = subject_folder(ws, f"format-{kind}", {name: make(), "notes.md": b"not a picture"})
    before = ws.state()
    (subject,) = load_subjects(str(folder), "ball")
    im = subject.images[0]
    unchanged = changes(before, ws.state())
    report.case(
        "bad input",
        "API",
        f"load_subjects of a folder with a {kind} {name} (and notes.md beside it)",
        expected + "; notes.md ignored",
        f"{len(subject.images)} image, {im.shape[1]}x{im.shape[0]} {im.dtype}, "
        f"mean colour {im.reshape(-1, 3).mean(0).round().tolist()}",
        unchanged,
    )
    assert len(subject.images) == 1 and im.dtype == np.uint8 and im.shape[2] == 3 and check(im)
    assert unchanged == "yes"


# ---------------------------------------------------------------------------------------------------------------
# the Python API and the app's own layer (no server needed)
# ---------------------------------------------------------------------------------------------------------------


def api_cases(ws: Workspace) -> dict[str, tuple[str, str, Callable[[], object], str]]:
    """id -> (surface, what is given, the call, what its LimnerError must say)."""
    from limner.app import library as lib
    from limner.app.jobs import JobQueue
    from limner.generation import GenerationSettings
    from limner.io import child, read_tensors
    from limner.methods import get_method
    from limner.models.loading import load_base
    from limner.regions import split_regions
    from limner.training import TrainConfig

    uploads = ws.inputs / "uploads"
    uploads.mkdir(exist_ok=True)
    text = uploads / "notes.png"
    text.write_bytes(b"plain text, named like a picture")
    bomb = uploads / "bomb.png"
    bomb.write_bytes(bomb_png())
    corrupt_mask = uploads / "mask.png"
    corrupt_mask.write_bytes(b"\x89PNG not really")
    library = ws.root.parent / "app-library"  # outside the workspace: the store it makes is not a change
    no_vae = ws.inputs / "api-no-vae"
    if not no_vae.exists():
        partial_base(ws, no_vae.name, lambda f: shutil.rmtree(f / "vae"))
    return {
        "api-load-base-partial": (
            "API",
            "load_base(a folder without vae/)",
            lambda: load_base(str(no_vae), device="cpu"),
            "vae",
        ),
        "api-unknown-method": ("API", "get_method('nosuch')", lambda: get_method("nosuch"), "unknown method"),
        "api-trainconfig-batch": ("API", "TrainConfig(batch_size=0)", lambda: TrainConfig(batch_size=0), "batch_size"),
        "api-settings-type": (
            "API",
            "GenerationSettings(num_images='two')",
            lambda: GenerationSettings("a ball", num_images="two"),
            "num-images",
        ),
        "api-foreign-safetensors": (
            "API",
            "read_tensors(a foreign .safetensors)",
            lambda: read_tensors(foreign_safetensors(ws)),
            "damaged",
        ),
        "api-pickle": (
            "API",
            "read_tensors(x.pt) without allow_pickle",
            lambda: read_tensors(pickle_embedding(ws)),
            "allow-pickle",
        ),
        "api-child-traversal": (
            "API",
            "a manifest's file name '../x' read through io.child",
            lambda: child(ws.concept, "../x", "limner.json's file"),
            "outside",
        ),
        "api-regions-empty": (
            "API",
            "split_regions('a ball BREAK ')",
            lambda: split_regions("a ball BREAK "),
            "BREAK",
        ),
        "app-name-traversal": (
            "app",
            "concept name '../../evil' typed in Personalize",
            lambda: lib.safe_name("../../evil"),
            "name",
        ),
        "app-rename-traversal": (
            "app",
            "Library rename to '../x'",
            lambda: lib.rename(lib.Entry(ws.concept, lib.CONCEPTS, {}), "../x"),
            "name",
        ),
        "app-upload-wrong-type": (
            "app",
            "an upload of a text file named notes.png",
            lambda: lib.save_references(ws.inputs / "upload-text", [text]),
            "notes.png",
        ),
        "app-upload-bomb": (
            "app",
            "an upload of a decompression bomb (14000 x 14000 PNG)",
            lambda: lib.save_references(ws.inputs / "upload-bomb", [bomb]),
            "pixels",
        ),
        "app-upload-mask-corrupt": (
            "app",
            "a mask upload of random bytes named mask.png",
            lambda: lib.save_references(ws.inputs / "upload-mask", [ws.refs / "0.png"], masks=[corrupt_mask]),
            "mask.png is not a readable mask",
        ),
        "app-unknown-job": (
            "app",
            "a job of kind 'mine'",
            lambda: JobQueue(library).submit("mine", {}),
            "unknown job kind",
        ),
    }


API_IDS = [
    "api-load-base-partial",
    "api-unknown-method",
    "api-trainconfig-batch",
    "api-settings-type",
    "api-foreign-safetensors",
    "api-pickle",
    "api-child-traversal",
    "api-regions-empty",
    "app-name-traversal",
    "app-rename-traversal",
    "app-upload-wrong-type",
    "app-upload-bomb",
    "app-upload-mask-corrupt",
    "app-unknown-job",
]


@pytest.mark.parametrize("case", API_IDS)
def test_api_and_app_bad_input(ws, report, case):
    surface, given, call, said = api_cases(ws)[case]
    before = ws.state()
    try:
        call()
        actual, error = "returned without an error", None
    except LimnerError as e:
        actual, error = f"LimnerError: {e}", e
    except Exception as e:  # noqa: BLE001 - a case's point: anything but a LimnerError is a defect
        actual, error = f"{type(e).__name__} (not a LimnerError): {e}", None
    unchanged = changes(before, ws.state())
    report.case("bad input", surface, given, f"LimnerError saying '{said}'", actual, unchanged)
    assert error is not None and said in str(error), actual
    assert unchanged == "yes"


def test_app_upload_is_read_as_the_command_line_reads_it(ws, report):
    """An EXIF-rotated photo and a transparent PNG uploaded in the app become the same pictures `limner train
    --subject` reads from a folder: upright, transparency over white."""
    from limner.app import library as lib
    from limner.evaluation.subjects import load_images

    src = ws.inputs / "phone"
    src.mkdir(exist_ok=True)
    (src / "rotated.jpg").write_bytes(exif_rotated_jpeg())
    (src / "cutout.png").write_bytes(rgba_png())
    before = ws.state()
    saved = lib.save_references(ws.root.parent / "upload-target", [src / "rotated.jpg", src / "cutout.png"])
    unchanged = changes(before, ws.state())
    uploaded, direct = load_images(saved), load_images(src)
    shapes = [im.shape for im in uploaded]
    report.case(
        "bad input",
        "app",
        "uploads: an EXIF-rotated JPEG and a transparent PNG",
        "saved upright (40 wide x 48 high) and over white, as a folder given to `limner train` is read",
        f"saved {len(uploaded)} references, shapes {shapes}",
        unchanged,
    )
    # load_images reads the folder sorted: cutout.png, rotated.jpg
    assert shapes[0] == (48, 40, 3) and (uploaded[1][:, 24:] == 255).all()
    assert np.array_equal(uploaded[1], direct[0]) and np.abs(uploaded[0].astype(int) - direct[1]).max() <= 0
    assert unchanged == "yes"


def test_an_uploaded_mask_is_read_as_the_command_line_reads_one(ws, tmp_path):
    """A transparent PNG as a mask: its alpha says where the subject is, in the app as in a subject folder."""
    from limner.app import library as lib
    from limner.evaluation.subjects import load_subjects

    mask = tmp_path / "mask.png"
    mask.write_bytes(rgba_png())  # opaque on the left half
    saved = lib.save_references(tmp_path / "with-mask", [ws.refs / "0.png"], masks=[mask])
    (subject,) = load_subjects(str(saved), "ball")
    assert subject.masks[0][:, :24].all() and not subject.masks[0][:, 24:].any()


# ---------------------------------------------------------------------------------------------------------------
# prompts longer than the tokenizer; a full disk; an output folder that cannot be written
# ---------------------------------------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_tokenizer_is_drawn_and_said_once(ws, report, tmp_path):
    prompt = "a red ball " + " ".join(["on the beach"] * 60)
    out = tmp_path / "long"
    before = ws.state()
    r = CliRunner().invoke(app, out_at(gen_cmd(ws, prompt=prompt), out))
    unchanged = changes(before, ws.state())
    told = [line for line in r.output.splitlines() if "cut" in line]
    report.case(
        "bad input",
        "CLI",
        f"a prompt of {len(prompt.split())} words (the tokenizer holds 77 tokens)",
        "exit 0, the image drawn, one line naming what was cut",
        f"exit {r.exit_code}: {told[0] if told else '(nothing said)'}",
        unchanged,
    )
    assert r.exit_code == 0 and len(told) == 1 and len(told[0]) < 300 and list(out.glob("*-00.png")), r.output
    assert unchanged == "yes"


def mounted_tmpfs(path: Path, size: str, read_only: bool = False) -> bool:
    """A tmpfs at `path` (root with CAP_SYS_ADMIN only; elsewhere the case is a counted skip)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode
        == 0
    )


def unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def test_a_full_disk_is_one_line_and_earlier_files_stay(ws, report, tmp_path):
    disk = tmp_path / "disk"
    given = "train and generate onto a full disk (a 1 MB tmpfs filled to its last bytes)"
    expected = "exit 2, one line: the disk is full; earlier files on it intact"
    if not mounted_tmpfs(disk, "1m"):
        report.case("bad input", "CLI", given, expected, "skipped: mounting a tmpfs needs root with CAP_SYS_ADMIN")
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root (CAP_SYS_ADMIN)")
    try:
        shutil.copytree(ws.concept, disk / "earlier")
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill it: whatever the command writes next finds no space
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        before = ws.state() | tree_state(disk / "earlier")
        results = []
        for args in (
            out_at(train_cmd(ws, ws.refs), disk / "new"),
            out_at(gen_cmd(ws), disk / "images"),
        ):
            results.append((args[0], CliRunner().invoke(app, args)))
        unchanged = changes(before, ws.state() | tree_state(disk / "earlier"))
        actual = "; ".join(f"{name}: exit {r.exit_code}: {r.output.strip().splitlines()[-1]}" for name, r in results)
        report.case("bad input", "CLI", given, expected, actual, unchanged)
        for _, r in results:
            lines = r.output.strip().splitlines()
            assert r.exit_code == 2 and "disk is full" in lines[-1] and "Traceback" not in r.output, r.output
        assert unchanged == "yes"
    finally:
        unmount(disk)


def test_an_output_folder_that_cannot_be_written_is_one_line(ws, report, tmp_path):
    ro = tmp_path / "read-only"
    given = "generate --out inside a read-only folder"
    expected = "exit 2, one line naming the folder that cannot be written"
    if os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)
    elif not mounted_tmpfs(ro, "1m", read_only=True):
        report.case(
            "bad input", "CLI", given, expected, "skipped: root ignores permissions, and no tmpfs can be mounted"
        )
        pytest.skip("root writes anywhere; a read-only folder needs a read-only tmpfs (CAP_SYS_ADMIN)")
    try:
        before = ws.state()
        r = CliRunner().invoke(app, out_at(gen_cmd(ws), ro / "images"))
        unchanged = changes(before, ws.state())
        lines = r.output.strip().splitlines()
        report.case(
            "bad input", "CLI", given, expected, f"exit {r.exit_code}: {lines[-1] if lines else ''}", unchanged
        )
        assert r.exit_code == 2 and len(lines) == 1 and str(ro) in lines[0] and "Traceback" not in r.output, r.output
        assert unchanged == "yes"
    finally:
        if os.geteuid() == 0:
            unmount(ro)
        else:
            ro.chmod(0o755)
