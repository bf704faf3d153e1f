"""`limner train` from the command line: subject folders (captions beside images, bad folders), a
concepts list, --set and --token, the trained concept in `limner generate`, and exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import image_folder

from limner.errors import LimnerError
from limner.methods import get_method


def test_cli_train_then_generate_with_the_concept(tiny_base, tmp_path):
    from typer.testing import CliRunner

    from limner.cli import app

    folder = image_folder(tmp_path / "subj")
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "train",
            "--method",
            "textual_inversion",
            "--subject",
            str(folder),
            "--class-noun",
            "ball",
            "--steps",
            "2",
            "--batch-size",
            "1",
            "--token",
            "<blob>",
            "--base",
            str(tiny_base),
            "--out",
            str(tmp_path / "concept"),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "generate",
            "a <blob> in the snow",
            "-n",
            "1",
            "--steps",
            "1",
            "--base",
            str(tiny_base),
            "--concept",
            str(tmp_path / "concept"),
            "--out",
            str(tmp_path / "img"),
        ],
    )
    assert r.exit_code == 0, r.output
    # another base: refused unless --force
    from conftest import build_tiny_pipeline

    other = tmp_path / "other-base"
    build_tiny_pipeline(other)
    from safetensors.torch import load_file, save_file

    unet_file = other / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(unet_file))
    state = {k: v + 0.01 for k, v in state.items()}
    save_file(state, str(unet_file))
    args = [
        "generate",
        "a <blob>",
        "-n",
        "1",
        "--steps",
        "1",
        "--base",
        str(other),
        "--concept",
        str(tmp_path / "concept"),
        "--out",
        str(tmp_path / "o2"),
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "trained on base" in r.output
    assert runner.invoke(app, args + ["--force"]).exit_code == 0


def test_cli_train_settings_and_token_reach_the_method(tiny_base, tmp_path):
    from typer.testing import CliRunner

    from limner.cli import app

    folder = image_folder(tmp_path / "subj")
    args = [
        "train",
        "--method",
        "dreambooth_lora",
        "--subject",
        str(folder),
        "--class-noun",
        "ball",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--base",
        str(tiny_base),
        "--out",
        str(tmp_path / "c"),
    ]
    r = CliRunner().invoke(
        app,
        args
        + [
            "--token",
            "zwx",
            "--set",
            "prior_preservation=none",
            "--set",
            "lora_rank=2",
            "--set",
            "checkpoint_every=0",
            "--set",
            "seed=3",
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "c" / "limner.json").read_text())
    assert m["identifier"] == "zwx" and m["config"]["lora_rank"] == 2 and m["config"]["train"]["checkpoint_every"] == 0
    assert m["config"]["train"]["seed"] == 3, "a trainer setting given with --set is not reset by an option left out"
    r = CliRunner().invoke(
        app, args[:-1] + [str(tmp_path / "c2"), "--set", "seed=3", "--seed", "5", "--set", "prior_preservation=none"]
    )
    assert (
        r.exit_code == 0 and json.loads((tmp_path / "c2" / "limner.json").read_text())["config"]["train"]["seed"] == 5
    ), "the explicit option wins"
    r = CliRunner().invoke(app, args + ["--set", "prior_preservation"])
    assert r.exit_code == 2 and "key=value" in r.output


def test_cli_trains_a_concepts_list_jointly_with_custom_diffusion_only(tiny_base, tmp_path):
    """A JSON list of subjects (the paper's concepts list): Custom Diffusion trains them together, with
    as many default steps per concept as for one; a method without joint training says so."""
    from typer.testing import CliRunner

    from limner.cli import app
    from limner.methods.custom_diffusion import default_train_config

    entries = [
        {"name": name, "path": str(image_folder(tmp_path / name)), "class_noun": noun}
        for name, noun in (("blob", "ball"), ("cube", "box"))
    ]
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps(entries))
    assert default_train_config(2).max_steps == 2 * default_train_config().max_steps
    args = ["train", "--subject", str(concepts), "--steps", "1", "--batch-size", "1", "--base", str(tiny_base)]
    r = CliRunner().invoke(
        app,
        [*args, "--method", "custom_diffusion", "--set", "prior_preservation=false", "--out", str(tmp_path / "joint")],
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "joint" / "limner.json").read_text())
    assert (
        manifest["subject"] == ["blob", "cube"]
        and manifest["class_nouns"] == ["ball", "box"]
        and manifest["steps"] == 1
    )
    r = CliRunner().invoke(app, [*args, "--method", "dreambooth_lora", "--out", str(tmp_path / "db")])
    assert r.exit_code != 0 and "trains one at a time" in r.output and not (tmp_path / "db").exists()
    r = CliRunner().invoke(
        app, [*args, "--method", "custom_diffusion", "--token", "<cat>", "--out", str(tmp_path / "tok")]
    )
    assert r.exit_code == 2 and "<new1> to <new2>" in r.output and not (tmp_path / "tok").exists()


def test_caption_files_beside_images_and_unknown_settings(tmp_path):
    from PIL import Image

    from limner.evaluation.subjects import folder_subject

    for i in range(2):
        Image.new("RGB", (32, 32), (i * 100, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("  on a red\nsofa ")
    s = folder_subject(tmp_path, class_noun="dog")
    assert s.captions == ["on a red sofa", ""]
    with pytest.raises(LimnerError, match="has no setting 'rnak'"):
        get_method("dreambooth_lora").personalize(None, s, tmp_path / "c", rnak=4)


def test_bad_subject_folders_get_specific_errors_and_leave_earlier_concepts_alone(tiny_base, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from limner.cli import app

    def train(folder, out, *extra):
        return CliRunner().invoke(
            app,
            [
                "train",
                "--method",
                "textual_inversion",
                "--subject",
                str(folder),
                "--steps",
                "1",
                "--batch-size",
                "1",
                "--base",
                str(tiny_base),
                "--out",
                str(out),
                *extra,
            ],
        )

    empty = tmp_path / "empty"
    empty.mkdir()
    r = train(empty, tmp_path / "c", "--class-noun", "ball")
    assert r.exit_code == 2 and "has no images" in r.output and str(empty) in r.output
    # one image, a grayscale 16-bit one, a stray non-image file: trains (one image is enough to start)
    single = tmp_path / "single"
    single.mkdir()
    Image.fromarray(np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30).save(single / "a.png")
    (single / "notes.md").write_text("not an image")
    good = tmp_path / "good"
    r = train(
        single, good, "--class-noun", "teddy bear"
    )  # a class noun of two words: its tokens' mean initialises <s*>
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}
    # a corrupt file: an error naming it, and the concept already in --out is untouched
    (single / "b.png").write_bytes(b"\x89PNG not really")
    r = train(single, good, "--class-noun", "ball")
    assert r.exit_code == 2 and "b.png" in r.output and "not a readable image" in r.output
    assert before == {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}


def test_the_command_line_process_keeps_exit_codes_and_output(tmp_path):
    """The CLI skips the interpreter's teardown after a command: codes and output must survive it."""
    import subprocess
    import sys

    def limner(*args):
        return subprocess.run([sys.executable, "-m", "limner.cli", *args], capture_output=True, text=True, timeout=120)

    ok = limner("train", "--help")
    assert ok.returncode == 0 and "--subject" in ok.stdout
    bad = limner(
        "train", "--method", "textual_inversion", "--subject", str(tmp_path / "missing"), "--out", str(tmp_path / "c")
    )
    assert bad.returncode == 2 and "missing" in bad.stderr and not (tmp_path / "c" / "limner.json").exists()


def test_recipe_paper_trains_the_papers_settings_and_says_so(tiny_base, tmp_path):
    """`--set recipe=paper` is the paper's recipe (one vector, no captions, no layout steps, 3000 steps at
    2e-3 for Textual Inversion), what is given beside it wins, the manifest and model card say which recipe
    made the concept, and its generations lay nothing out from the class prompt; an unknown recipe is an
    error naming the ones there are."""
    from typer.testing import CliRunner

    from limner.cli import app
    from limner.concepts import read_manifest
    from limner.conditioning import apply_concepts
    from limner.models.loading import load_base

    folder = image_folder(tmp_path / "subj")
    args = ["train", "--method", "textual_inversion", "--subject", str(folder), "--class-noun", "ball"]
    args += ["--base", str(tiny_base), "--set", "recipe=paper", "--set", "batch_size=1", "--steps", "2"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "paper")])
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "paper")
    cfg, train = m["config"], m["config"]["train"]
    assert (cfg["recipe"], cfg["num_vectors"], cfg["captions"], cfg["layout_fraction"]) == ("paper", 1, False, 0.0)
    assert (train["learning_rate"], train["min_snr_gamma"], train["max_grad_norm"], train["flip"]) == (
        2e-3,
        None,
        0.0,
        True,
    )
    assert (train["max_steps"], train["batch_size"]) == (2, 1), "settings given beside the recipe win"
    assert "recipe: the paper's" in (tmp_path / "paper" / "README.md").read_text()
    base = load_base(str(tiny_base), device="cpu")
    applied = apply_concepts(base, [tmp_path / "paper"])
    assert applied.condition("a <paper> in the snow", 25).layout_steps == 0  # the token: its folder's name
    applied.uninstall()
    r = CliRunner().invoke(app, [*args[:-4], "--set", "recipe=original", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "recipe=original" in r.output and "limner, paper" in r.output
    assert not (tmp_path / "x" / "limner.json").exists()
