"""Evaluation: encoders loaded from folders as a user would, metrics on known cases, subjects, the
cached protocol and the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from limner.cli import app
from limner.encoders import CLIPEncoder, DINOEncoder
from limner.errors import LimnerError
from limner.evaluation.metrics import diversity, mean_similarity_to_references, text_alignment
from limner.evaluation.subjects import dreambench_prompts, load_subjects, world_subjects
from limner.world import vocab

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from limner.world.stack import build_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=tok.model_max_length,
            eos_token_id=tok.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dino")
    Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def random_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8) for _ in range(n)]


def test_identical_images_score_one_and_have_no_diversity(tiny_clip, tiny_dino):
    ims = random_images(3)
    for enc in (CLIPEncoder(tiny_clip), DINOEncoder(tiny_dino)):
        e = enc.images(ims)
        assert torch.allclose(mean_similarity_to_references(e[:1], e[:1]), torch.ones(1), atol=1e-5)
        assert diversity(torch.cat([e[:1]] * 4)) == pytest.approx(0.0, abs=1e-5)
        assert diversity(e) > 0
    clip = CLIPEncoder(tiny_clip)
    e = clip.images(ims)
    assert mean_similarity_to_references(e[1:2], e[:1]).item() < 0.999, "different images are not identical"
    t = clip.texts(["a red ball", "a blue dog"])
    assert t.shape == (2, 16) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert text_alignment(t, t).allclose(torch.ones(2), atol=1e-5)


def test_encoder_folder_of_the_wrong_kind(tiny_clip, tiny_dino, tmp_path):
    with pytest.raises(LimnerError, match="not CLIP"):
        CLIPEncoder(tiny_dino)
    with pytest.raises(LimnerError, match="DINO"):
        DINOEncoder(tiny_clip)
    with pytest.raises(LimnerError, match="no config.json"):
        CLIPEncoder(tmp_path)


def test_subject_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LimnerError, match="no images"):
        load_subjects(str(empty), "dog")
    dog = tmp_path / "dog"
    dog.mkdir()
    Image.fromarray(random_images(1)[0]).save(dog / "a.png")
    with pytest.raises(LimnerError, match="class noun"):
        load_subjects(str(dog))
    (dog / "subject.json").write_text(json.dumps({"class_noun": "dog", "live": True}))
    (s,) = load_subjects(str(dog))
    assert s.class_noun == "dog" and len(s.images) == 1 and len(s.prompts) == 25
    assert any("wearing" in p.template for p in s.prompts)
    (dog / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(LimnerError, match="broken.jpg"):
        load_subjects(str(dog))


def test_subject_masks_from_a_masks_folder(tmp_path):
    """masks/NAME.png beside NAME.jpg: white (or opaque) where the subject is; one per image, of its size."""
    cup = tmp_path / "cup"
    (cup / "masks").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(random_images(1)[0][:20, :30]).save(cup / f"{name}.jpg")
    left = np.zeros((20, 30), np.uint8)
    left[:, :10] = 255
    Image.fromarray(left).save(cup / "masks" / "a.png")
    with pytest.raises(LimnerError, match="no mask for b.jpg"):
        load_subjects(str(cup), "cup")
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[5:, :, 3] = 255  # a cut-out: the subject is where the alpha is
    Image.fromarray(rgba).save(cup / "masks" / "b.png")
    (s,) = load_subjects(str(cup), "cup")
    assert s.masks[0][:, :10].all() and not s.masks[0][:, 10:].any()
    assert s.masks[1][5:].all() and not s.masks[1][:5].any()
    Image.fromarray(left[:, :20]).save(cup / "masks" / "a.png")
    with pytest.raises(LimnerError, match="a mask must be the size of its image"):
        load_subjects(str(cup), "cup")


def test_exif_orientation_is_applied(tmp_path):
    folder = tmp_path / "cup"
    folder.mkdir()
    im = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(folder / "a.jpg", exif=exif)
    (s,) = load_subjects(str(folder), "cup")
    assert s.images[0].shape[:2] == (40, 20)


def test_dreambench_prompt_lists():
    assert len(dreambench_prompts(False)) == len(dreambench_prompts(True)) == 25
    assert {p.kind for p in dreambench_prompts(True)} == {"recontextualisation", "accessorisation", "property"}


def test_world_subjects_and_errors():
    assert len(load_subjects("world:objects")) == 12 and len(load_subjects("world:identities")) == 8
    with pytest.raises(LimnerError, match="unknown world subject"):
        load_subjects("world:nobody")
    with pytest.raises(LimnerError, match="does not exist"):
        load_subjects("/no/such/folder")


def test_cli_rejects_unknown_method_and_missing_clip(tmp_path):
    r = runner.invoke(app, ["eval", "--method", "magic", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "unknown method 'magic'" in r.output
    folder = tmp_path / "cat"
    folder.mkdir()
    Image.fromarray(random_images(1)[0]).save(folder / "a.png")
    r = runner.invoke(app, ["eval", "--subjects", str(folder), "--class-noun", "cat", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "--clip" in r.output


def test_world_bench_bounds_cache_and_report(tmp_path):
    args = [
        "eval",
        "--subjects",
        "world:duo_ball,ada",
        "--prompts",
        "2",
        "-n",
        "2",
        "--steps",
        "6",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "report"),
        "--device",
        "cpu",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    # one bar over every image: 2 subjects x (lower bound: 2 prompts + the drift prompt, upper: 2 prompts) x 2
    assert r.stderr.count("eval: 100%") == 1 and "20/20 [" in r.stderr, r.stderr
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    lower, upper = results["rows"]["lower-bound"]["mean"], results["rows"]["upper-bound"]["mean"]
    assert upper["subject_fidelity"] > lower["subject_fidelity"] + 0.2, (
        "renders of the subject are the subject; the class prompt is not"
    )
    assert upper["prompt_fidelity"] >= 0.9
    assert 0 <= upper["class_accuracy"] <= 1 and 0 <= lower["class_accuracy"] <= 1, "objects' form is read too"
    for key in ("clip_i", "clip_t", "diversity", "face_sim", "language_drift"):
        assert key in lower
    assert results["cache"]["misses"] > 0
    assert set(results["probes"]) == {"attributes", "accessory", "subject", "identity"}, (
        "a result says which probes read it"
    )
    # a rerun does no work twice, and drops the images of an earlier page it no longer shows
    images = tmp_path / "report" / "images"
    (images / "0123456789abcdef.png").write_bytes(b"an image of an earlier report")
    (images / "notes.txt").write_text("not limner's")
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and json.loads((tmp_path / "report" / "results.json").read_text())["cache"]["misses"] == 0
    assert "20/20 [" in r.stderr, "images found in the cache count too"
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    srcs = re.findall(r"src='([^']+)'", page)
    assert len(srcs) > 10 and all((tmp_path / "report" / s).exists() for s in srcs)
    left = {p.name for p in images.iterdir()}
    assert left == {Path(s).name for s in srcs if s.startswith("images/")} | {"notes.txt"}
    refs = re.findall(r"references: (.*?)</div>", page)
    assert len(refs) == 2 and refs[0] != refs[1], "each subject shows its own references"
    assert (tmp_path / "report" / "fidelity.png").exists() and "| lower-bound |" in (
        tmp_path / "report" / "results.md"
    ).read_text()


def test_described_row_tells_the_subject_in_words(tmp_path):
    from limner.world.bench import described_prompt, object_prompts, subject_by_name

    duo, prompts = subject_by_name("duo_ball"), object_prompts()
    told = [described_prompt(duo, p) for p in prompts]
    assert told[0] == "a red and white ball with a blue heart on the beach"
    assert "a red ball with a blue heart on the grass" in told, "a colour the prompt asks for replaces the body's"
    assert all(t.endswith(vocab.CONTEXTS[p.context]) for t, p in zip(told, prompts))
    args = ["eval", "--subjects", "world:duo_ball", "--prompts", "1", "-n", "1", "--steps", "4"]
    args += ["--method", "described", "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "report" / "results.json").read_text())["rows"]
    lower, described = rows["lower-bound"], rows["described"]
    assert "language_drift" not in described["mean"], "words for the subject have no class-prompt drift to read"
    (first,) = lower["images"]["duo_ball"]["a ball on the beach"]
    (told_image,) = described["images"]["duo_ball"]["a ball on the beach"]
    assert Path(first).read_bytes() != Path(told_image).read_bytes(), "the same seed, other words, another image"
    r = runner.invoke(app, [*args[:2], "world:ada", *args[3:], "--no-bounds", "--out", str(tmp_path / "ada")])
    assert r.exit_code == 2 and "world:objects" in r.output and not (tmp_path / "ada").exists()


def test_class_accuracy_reads_the_drawn_form_not_the_looks():
    from limner.evaluation.scoring import Encoders, drawn_as_class
    from limner.models.loading import WORLD_PROBES
    from limner.world.probes import Probes

    enc = Encoders(clip=None, probes=Probes(WORLD_PROBES))
    dog = world_subjects("world:spot_dog")[0]
    images = [Image.fromarray(a) for a in dog.images]
    assert np.mean(drawn_as_class(images, "dog", enc)) >= 0.8
    assert not any(drawn_as_class(images, "ball", enc)), "a dog in a ball's colours is still no ball"


def test_image_modes_are_converted_faithfully(tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    grey16 = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "a16.png")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "b_rgba.png")
    Image.fromarray(np.full((32, 32), 128, np.uint8), "L").save(folder / "c_grey.png")
    a, b, c = load_subjects(str(folder), "thing")[0].images
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3) and a.max() == 255 and a.min() == 0 and 100 < a.mean() < 155
    assert (b == 255).all(), "transparent pixels become white, not their hidden colour"
    assert (c == 128).all()


def test_bench_measures_each_row_in_its_own_process(tmp_path):
    r = runner.invoke(
        app,
        [
            "bench",
            "--subject",
            "world:duo_ball",
            "-n",
            "1",
            "--steps",
            "2",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "report"),
            "--device",
            "cpu",
            "--method",
            "textual_inversion:max_steps=2",
        ],
    )
    assert r.exit_code == 0, r.output
    record, trained = json.loads((tmp_path / "report" / "bench.json").read_text())
    assert record["row"] == "lower-bound" and record["seconds_per_image"] > 0 and record["peak_memory_mb"] > 50
    assert trained["row"] == "textual_inversion:max_steps=2" and trained["steps"] == 2, (
        "a row's settings reach its training"
    )
    assert trained["train_peak_memory_mb"] > 50 and not trained["cached_concept"]
    assert "| lower-bound |" in (tmp_path / "report" / "bench.md").read_text()
    r = runner.invoke(app, ["bench", "--subject", "world:duo_ball,ada", "--out", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "several subjects" in r.output
    r = runner.invoke(app, ["bench", "--method", "lower-bound", "--out", str(tmp_path / "r3")])
    assert r.exit_code == 2 and "measures the lower bound first" in r.output
