"""Regional prompts (MultiDiffusion): each prompt draws its own window of one wider image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from limner.cli import app
from limner.errors import LimnerError
from limner.generation import GenerationSettings, generate
from limner.models.loading import WORLD_PROBES, load_base
from limner.regions import canvas_width, mentions, split_regions, window_offsets


def test_prompts_split_on_break():
    assert split_regions("a red ball, BREAK a blue cup on the beach") == ["a red ball", "a blue cup on the beach"]
    for bad in ("a red ball", "a red ball BREAK", "BREAK a cup"):
        with pytest.raises(LimnerError, match="BREAK"):
            split_regions(bad)


def test_a_region_names_a_token_as_a_word_of_its_own():
    assert mentions("a <new1> box on the beach", "<new1>") and not mentions("a <new10> box", "<new1>")
    assert (
        mentions("a sks dog, at night", "sks") and not mentions("a sksx dog", "sks") and not mentions("a dog", "sks")
    )


@pytest.mark.parametrize("regions", [2, 3, 4])
def test_windows_overlap_and_cover_the_canvas(regions):
    width = canvas_width(64, regions)
    lefts = window_offsets(width, 64, regions, factor=4)
    assert lefts[0] == 0 and lefts[-1] + 64 == width
    assert all(0 < b - a < 64 for a, b in zip(lefts, lefts[1:])), "neighbours overlap"
    assert all(x % 4 == 0 for x in lefts), "windows sit on the latent grid"


def colours(images, lefts):
    from limner.world.probes import Probes

    probes = Probes(WORLD_PROBES)
    names = probes.labels("attributes", "colour")
    out = []
    for left in lefts:
        crops = np.stack([np.asarray(im.convert("RGB"))[:, left : left + 64] for im in images])
        out.append([names[i] for i in probes.predict("attributes", crops)["colour"].argmax(-1)])
    return out


def test_each_window_draws_its_own_prompt_on_the_world():
    base = load_base(device="cpu")
    s = GenerationSettings(
        "a red ball on the grass BREAK a blue ball on the grass", num_images=3, steps=12, regions=True
    )
    result = generate(base, s)
    lefts = [r["left"] for r in result.record["regions"]]
    assert result.images[0].size == (112, 64) and lefts == [0, 48]
    left, right = colours(result.images, lefts)
    assert left.count("red") >= 2 and right.count("blue") >= 2, (left, right)
    # the same seeds with the prompts swapped: the colours swap sides
    s.prompt = "a blue ball on the grass BREAK a red ball on the grass"
    left, right = colours(generate(base, s).images, lefts)
    assert left.count("blue") >= 2 and right.count("red") >= 2, (left, right)


def test_regions_on_a_user_folder_and_sdxl(tiny_base, tiny_sdxl):
    for folder in (tiny_base, tiny_sdxl):
        base = load_base(str(folder), device="cpu")
        s = GenerationSettings("a ball BREAK a cup BREAK a kite", num_images=2, steps=3, regions=True, batch_size=1)
        result = generate(base, s)
        assert result.images[0].size == (canvas_width(base.resolution, 3), base.resolution)
        assert [r["prompt"] for r in result.record["regions"]] == ["a ball", "a cup", "a kite"]
        assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1])), (
            "each image has its own seed"
        )


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_window_by_window_denoising_matches_all_windows_at_once(tiny_base, tiny_sdxl, family):
    base = load_base(str(tiny_base if family == "sd" else tiny_sdxl), device="cpu")
    s = GenerationSettings("a red ball BREAK a blue cup BREAK a tree", num_images=2, steps=3, regions=True)
    at_once = generate(base, s).images
    windows = []
    one_by_one = generate(base, s, before_window=windows.append).images
    assert windows == [0, 1, 2] * 3 + [None], "the hook runs before each window at every step, then once to restore"
    for x, y in zip(at_once, one_by_one):
        assert np.abs(np.asarray(x, float) - np.asarray(y, float)).max() <= 2


def test_cli_regions_and_bad_input(tiny_base, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        [
            "generate",
            "a ball BREAK a cup",
            "--regions",
            "--base",
            str(tiny_base),
            "-n",
            "1",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    record = json.loads((out / "00001.json").read_text())
    assert record["settings"]["regions"] and len(record["regions"]) == 2
    assert Image.open(out / "00001-00.png").size == (record["settings"]["width"], record["settings"]["height"])
    r = runner.invoke(
        app, ["generate", "a ball and a cup", "--regions", "--base", str(tiny_base), "--out", str(tmp_path / "x")]
    )
    assert r.exit_code != 0 and "BREAK" in r.output
    r = runner.invoke(
        app,
        [
            "generate",
            "a ball BREAK a cup",
            "--regions",
            "--width",
            "8",
            "--base",
            str(tiny_base),
            "--out",
            str(tmp_path / "y"),
        ],
    )
    assert r.exit_code != 0 and "narrower than one region" in r.output
