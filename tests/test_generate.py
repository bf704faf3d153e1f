"""Generation on a local diffusers folder, through the Python API and the CLI, and its bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from limner.cli import app
from limner.errors import LimnerError
from limner.generation import GenerationSettings, generate
from limner.models.loading import load_base

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_base(str(tiny_base), device="cpu")


def test_generate_writes_pngs_with_parameters_grid_and_record(tiny_base, tmp_path):
    r = cli(
        "generate",
        "a red ball on the beach",
        "-n",
        3,
        "--seed",
        7,
        "--steps",
        2,
        "--base",
        tiny_base,
        "--out",
        tmp_path,
        "--batch-size",
        2,
        "--scheduler",
        "euler",
    )
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "00001.json").read_text())
    assert record["seeds"] == [7, 8, 9] and record["settings"]["scheduler"] == "euler"
    assert len(record["base"]["fingerprint"]) == 16 and record["timings"]["per_image_s"] > 0
    for name in record["files"]["images"]:
        im = Image.open(tmp_path / name)
        assert im.size == (16, 16)
        assert "a red ball on the beach" in im.text["parameters"] and "Seed: " in im.text["parameters"]
    assert Image.open(tmp_path / record["files"]["grid"]).size == (48, 16)
    # a second run never overwrites the first
    assert cli("generate", "a dog", "-n", 1, "--steps", 1, "--base", tiny_base, "--out", tmp_path).exit_code == 0
    assert (tmp_path / "00002.json").exists() and (tmp_path / "00001-00.png").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_each_image_depends_only_on_its_seed(base):
    s = GenerationSettings("a blue cup in the snow", num_images=3, seed=5, steps=2, batch_size=3)
    together = generate(base, s).images
    alone = generate(
        base, GenerationSettings("a blue cup in the snow", num_images=1, seed=7, steps=2, batch_size=1)
    ).images
    assert np.array_equal(np.asarray(together[2]), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(together[0]), np.asarray(together[1]))


@pytest.mark.parametrize("guidance", [5.0, 1.0])  # with and without classifier-free guidance
@pytest.mark.parametrize("folder", ["tiny_base", "tiny_sdxl"])
def test_layout_steps_follow_the_layout_prompt_then_the_prompt(request, folder, guidance):
    base = load_base(str(request.getfixturevalue(folder)), device="cpu")

    def draw(prompt, **layout):
        s = GenerationSettings(prompt, num_images=2, steps=4, guidance_scale=guidance, batch_size=2, **layout)
        return np.stack([np.asarray(im, dtype=float) for im in generate(base, s).images])

    plain = draw("a red ball on the beach")
    # swapping to the very same words changes nothing: the swap keeps the negative half where it was
    assert np.array_equal(
        draw("a red ball on the beach", layout_prompt="a red ball on the beach", layout_steps=2), plain
    )
    mixed = draw("a red ball on the beach", layout_prompt="a blue cup in the snow", layout_steps=3)
    assert not np.array_equal(mixed, plain) and not np.array_equal(mixed, draw("a blue cup in the snow"))


def test_layout_steps_are_checked(base):
    with pytest.raises(LimnerError, match="--layout-steps 4 must be between 1 and"):
        generate(base, GenerationSettings("a dog", steps=4, layout_prompt="a dog", layout_steps=4))
    with pytest.raises(LimnerError, match="needs a layout_prompt"):
        generate(base, GenerationSettings("a dog", steps=4, layout_steps=2))


@pytest.mark.parametrize("scheduler", ["dpm++", "ddim", "euler", "euler_a", "unipc"])
def test_every_scheduler_runs(base, scheduler):
    s = GenerationSettings("a star", num_images=1, steps=3, scheduler=scheduler)
    assert generate(base, s).images[0].size == (16, 16)


def test_long_prompt_warns_and_says_what_was_cut(base):
    words = " ".join(["red ball"] * 30)
    with pytest.warns(UserWarning, match="cut"):
        generate(base, GenerationSettings(words + " zebra", num_images=1, steps=1))


def test_cli_warns_on_long_prompt(tiny_base, tmp_path):
    r = cli("generate", " ".join(["a red ball"] * 20), "-n", 1, "--steps", 1, "--base", tiny_base, "--out", tmp_path)
    assert r.exit_code == 0 and "warning:" in r.output and "cut" in r.output


# ----------------------------------------------------------------------------- bad input


def assert_error(result, *needles):
    assert result.exit_code == 2, result.output
    for n in needles:
        assert n in result.output, result.output


def test_missing_base_path(tmp_path):
    assert_error(
        cli("generate", "a ball", "--base", tmp_path / "nope", "--out", tmp_path / "o"), "does not exist", "nope"
    )


def test_empty_base_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_error(cli("generate", "a ball", "--base", tmp_path / "empty", "--out", tmp_path / "o"), "is empty")


def test_folder_missing_a_component(tiny_base, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    shutil.rmtree(broken / "vae")
    assert_error(cli("generate", "a ball", "--base", broken, "--out", tmp_path / "o"), "'vae'", str(broken))


def test_unknown_scheduler(tiny_base, tmp_path):
    assert_error(
        cli("generate", "a ball", "--scheduler", "magic", "--base", tiny_base, "--out", tmp_path / "o"),
        "magic",
        "dpm++",
    )


def test_size_not_multiple_of_8(tiny_base, tmp_path):
    assert_error(
        cli("generate", "a ball", "--height", 30, "--base", tiny_base, "--out", tmp_path / "o"),
        "--height 30",
        "multiple of 8",
    )


def test_output_path_is_a_file(tiny_base, tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    assert_error(cli("generate", "a ball", "--base", tiny_base, "--out", f), "is a file")
    assert f.read_bytes() == b"x", "nothing already written is touched"


def test_single_file_needs_config(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"0")
    assert_error(cli("generate", "a ball", "--base", ckpt, "--out", tmp_path / "o"), "--config")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"0")
    assert_error(cli("generate", "a ball", "--base", pickle, "--out", tmp_path / "o"), "safetensors")


def test_errors_are_limner_errors_in_the_api(tmp_path):
    with pytest.raises(LimnerError, match="does not exist"):
        load_base(str(tmp_path / "missing"))


def test_auto_precision_is_half_on_a_gpu_but_full_for_the_world_base():
    """fp16 draws a real-sized model faster on a GPU; the tiny world base it draws slower, and differently
    from the CPU on which the world's numbers were measured (benchmarks/cuda)."""
    import torch

    from limner.models.loading import resolve_dtype

    gpu = torch.device("cuda")
    assert resolve_dtype("auto", gpu) == torch.float16 and resolve_dtype("auto", gpu, world=True) == torch.float32
    assert (
        resolve_dtype("auto", torch.device("cpu")) == torch.float32
        and resolve_dtype("bf16", gpu, world=True) == torch.bfloat16
    )


def test_the_command_line_drops_only_transformers_torchvision_fallback_notice():
    import logging

    from limner.cli import quiet_torchvision_fallback

    quiet_torchvision_fallback()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("transformers.utils.import_utils")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)  # the tests run transformers at TRANSFORMERS_VERBOSITY=error
    try:
        log.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` ..."
        )
        log.warning("some other notice")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert seen == ["some other notice"]


def test_the_libraries_loading_bars_show_only_with_verbose(tiny_base, tmp_path):
    """A user sees limner's own progress and results; diffusers' and transformers' loading bars only on --verbose."""
    import subprocess
    import sys

    def run(*flags):
        args = ["generate", "a ball", "-n", "1", "--steps", "1", "--base", str(tiny_base), "--out", str(tmp_path)]
        command = [sys.executable, "-m", "limner.cli", *flags, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    quiet, verbose = run(), run("--verbose")
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert "wrote 1 images" in quiet.stdout and "Loading pipeline components" not in quiet.stderr
    assert "Loading pipeline components" in verbose.stderr
    # limner's own bar, in both, also into a pipe (a log, or `limner app` reading its child's progress)
    assert "generate: 100%" in quiet.stderr and "1/1 [" in quiet.stderr and "Loading weights" not in quiet.stderr


def test_generate_shows_one_progress_bar_and_quiet_hides_it(tiny_base, tmp_path):
    args = ["generate", "a ball", "-n", 3, "--batch-size", 2, "--steps", 2, "--base", tiny_base]
    shown = cli(*args, "--out", tmp_path / "a")
    assert shown.exit_code == 0, shown.output
    assert shown.stderr.count("generate: 100%") == 1 and "3/3 [" in shown.stderr, shown.stderr
    assert "generate:" not in shown.stdout, "bars go to stderr: stdout stays the results"
    hidden = cli("--quiet", *args, "--out", tmp_path / "b")
    assert hidden.exit_code == 0 and "wrote 3 images" in hidden.stdout
    assert "generate:" not in hidden.stderr and "%|" not in hidden.stderr
