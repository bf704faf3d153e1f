"""The shipped world stack: it loads in plain diffusers, its probes measure, and it draws what it's asked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import lineage

from limner.models.loading import WORLD_BASE, WORLD_PROBES, load_base
from limner.world.probes import SPECS, evaluate_probe, load_probe


def test_shipped_weights_are_small_fp16_safetensors():
    files = [p for p in WORLD_BASE.rglob("*") if p.is_file()] + [p for p in WORLD_PROBES.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) < 60 * 2**20
    from safetensors import safe_open

    with safe_open(str(WORLD_BASE / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F16"
    record = json.loads((WORLD_BASE / "build.json").read_text())
    assert {"clip", "vae", "unet", "probes"} <= set(record["seconds"])


def test_plain_diffusers_loads_and_generates():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(WORLD_BASE)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red ball on the beach", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    assert out.images.shape == (1, 64, 64, 3)
    assert out.images.std() > 0.05, "a picture, not a flat field"


def test_the_world_base_folder_is_portable_to_older_stacks():
    """transformers 4.x with diffusers 0.3x (what many users run) loads the folder too: model_index.json names
    classes every transformers has (not transformers 5's CLIPImageProcessorPil), and the tokenizer ships the
    vocab.json + merges.txt that 4.x's slow CLIPTokenizer reads, tokenizing exactly as tokenizer.json does.
    Measured with transformers 4.57.6 + diffusers 0.35.2: plain from_pretrained loads it, and with the text
    encoder read through key_mapping (docs/README.md) draws the same pixels as this stack."""
    import shutil
    import tempfile

    from transformers import CLIPTokenizer

    from limner.models.saving import make_portable

    index = json.loads((WORLD_BASE / "model_index.json").read_text())
    assert not [v for v in index.values() if isinstance(v, list) and str(v[-1]).endswith("Pil")]
    assert make_portable(WORLD_BASE) == [], "the shipped folder is already portable"
    shipped = CLIPTokenizer.from_pretrained(WORLD_BASE / "tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(WORLD_BASE / "tokenizer" / name, tmp)
        slow_files_only = CLIPTokenizer.from_pretrained(tmp)
    prompts = ["a red and white ball with a blue heart on the beach", "a photo of a <s*> dog", "zebra-kite, 3 hats!"]
    for prompt in prompts:
        assert slow_files_only(prompt).input_ids == shipped(prompt).input_ids


def test_making_a_folder_portable_keeps_its_fingerprint(tiny_base, tmp_path):
    import shutil

    from limner.models.loading import fingerprint
    from limner.models.saving import PORTABLE_RECORD, make_portable

    folder = tmp_path / "base"
    shutil.copytree(tiny_base, folder)
    for name in ("vocab.json", "merges.txt"):
        (folder / "tokenizer" / name).unlink(missing_ok=True)
    index = folder / "model_index.json"
    saved = json.loads(index.read_text()) | {"feature_extractor": ["transformers", "CLIPImageProcessorPil"]}
    index.write_text(json.dumps(saved, indent=2))
    before = fingerprint(folder)
    assert set(make_portable(folder)) == {"model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt"}
    assert json.loads(index.read_text())["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert (folder / PORTABLE_RECORD).is_file() and fingerprint(folder) == before
    (folder / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text() + " ")
    assert fingerprint(folder) != before, "everything else still counts"


@pytest.mark.parametrize("name", list(SPECS))
def test_probes_are_accurate_on_fresh_renders(name):
    acc = evaluate_probe(load_probe(WORLD_PROBES, name), name, n=500, seed=4242)
    heads = ["heldout_identification"] if name == "identity" else list(SPECS[name].labels)
    for head in heads:
        assert acc[head] >= 0.95, (head, acc)


def test_world_check_reads_back_what_was_asked(capsys):
    from limner.world.check import ACCESSORY_CASES, world_check

    base = load_base(device="cpu")
    report = world_check(base, n=8, steps=15, subject_probe=False)
    bar = capsys.readouterr().err
    assert bar.count("world check: 100%") == 1 and f"{8 + ACCESSORY_CASES}/{8 + ACCESSORY_CASES} [" in bar, bar
    assert set(report["accuracy"]) == {"class", "colour", "context", "accessory"}
    assert len(report["cases"]) == 8 + ACCESSORY_CASES and report["seconds_per_image"] > 0
    worn = report["cases"][8:]
    assert all(
        f"with a {c['want']['accessory']} " in c["prompt"] and c["got"]["accessory"] in ("none", "hat", "bow")
        for c in worn
    )
    # chance is 1/8 for context and 1/12 for class: a working model is far above it even on 8 prompts
    assert report["accuracy"]["context"] >= 0.5 and report["accuracy"]["class"] >= 0.4


def test_subject_probe_knows_subjects_the_base_model_redrew():
    """The world bench's instrument must read the base model's pictures, not only crisp renders: renders of
    the held-out subjects, noised to 0.4 and redrawn from their class noun alone, keep every subject to
    the eye. A probe trained on renders alone read 0.64 of them right (cross_cup 0.01)."""
    from limner.world.check import redrawn_subjects
    from limner.world.probes import Probes

    images, labels = redrawn_subjects(load_base(device="cpu"), strength=0.4, per_subject=2)
    assert images.shape == (24, 64, 64, 3) and sorted(set(labels.tolist())) == list(range(12))
    probabilities, _ = Probes(WORLD_PROBES).subject_probabilities(images)
    assert (probabilities.argmax(-1).numpy() == labels).mean() >= 0.8


def test_accessory_probe_sees_hats_and_bows_as_the_vae_gives_them_back():
    """Everything the base draws passes through the world VAE, which blurs a hat to a cone: the attribute
    probe's accessory head, trained on crisp renders, reads none of them; the accessory probe must."""
    from limner.world.check import accessory_renders
    from limner.world.probes import Probes, vae_round_trip

    renders, worn = accessory_renders(per_subject=3)  # one hat, one bow, one bare per subject
    round_trips = vae_round_trip(load_base(device="cpu").pipe.vae, renders)
    probes = Probes(WORLD_PROBES)
    read = np.array(probes.read_attributes(round_trips, ("accessory",))["accessory"])
    wearing = worn != "none"
    assert (read[wearing] == worn[wearing]).mean() >= 0.7
    assert (read[~wearing] != "none").mean() <= 0.2
    crisp_head = np.array(probes.read("attributes", round_trips)["accessory"])
    assert (crisp_head[wearing] == worn[wearing]).mean() <= 0.2  # why the accessory probe exists


def test_world_base_generation_is_reproducible():
    from limner.generation import GenerationSettings, generate

    base = load_base(device="cpu")
    s = GenerationSettings("a yellow star in the snow", num_images=1, steps=8, seed=3)
    a, b = generate(base, s).images[0], generate(base, s).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


WORLD_ADAPTERS = WORLD_BASE.parent / "adapters"


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_shipped_world_adapters_are_small_fp16_and_reproducible(variant):
    """Each shipped adapter: fp16 safetensors in the official layout and its adapter.json, which records what
    `limner pretrain --from` runs again; no checkpoints; IP-Adapter's together within its 15 MB budget (issue 27;
    the other methods' shipped adapters keep budgets of their own)."""
    from safetensors import safe_open

    folder = WORLD_ADAPTERS / f"ip_adapter-{variant}"
    files = [p for p in WORLD_ADAPTERS.glob("ip_adapter-*/**/*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 15 * 2**20 and not any("checkpoints" in p.parts for p in files)
    with safe_open(str(folder / "ip_adapter.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
        assert {k.split(".")[0] for k in f.keys()} == {"image_proj", "ip_adapter"}
    manifest = json.loads((folder / "adapter.json").read_text())
    assert manifest["variant"] == variant and manifest["base_fingerprint"] == load_base(device="cpu").fingerprint
    assert manifest["data"]["kind"] == "world"
    # scripts/pretrain_world_adapters.sh: each first on another view, then continued on the target cut out
    stages = [(r["steps"], r["settings"]["pair"], r["train"]["seed"]) for r in lineage(manifest)]
    assert (
        stages
        == {"plain": [(1500, "cut", 7), (5000, "view", 0)], "plus": [(1500, "cut", 7), (4000, "view", 0)]}[variant]
    )


def test_the_shipped_adapter_draws_the_subject_more_than_the_adapter_off(tmp_path):
    """IP-Adapter on the demo's subject and four new contexts: the shipped adapter's pictures read as duo_ball
    by the subject probe more than the base's pictures from the class prompt (the adapter at scale 0)."""
    from limner.demo import run_demo

    record = run_demo(tmp_path / "demo", method_name="ip_adapter", images_per_prompt=2, device="cpu")
    on, off = (record["scores"][k]["subject_fidelity"] for k in ("personalized", "base_class_prompt"))
    assert record["encoded"] and on > off + 0.1, (on, off)


def test_an_identity_methods_demo_draws_a_held_out_person_more_like_them_than_the_base(tmp_path):
    """`limner demo --method storymaker` with no --subject personalizes a held-out person (not the object the other
    methods default to), and the shipped adapter's portraits read nearer that person than the base's; an object
    subject for an identity method is refused naming the people; a `world:` prefix is taken as written."""
    from limner.demo import run_demo
    from limner.errors import LimnerError

    record = run_demo(tmp_path / "demo", method_name="storymaker", images_per_prompt=2, device="cpu")
    on, off = (record["scores"][k]["subject_fidelity"] for k in ("personalized", "base_class_prompt"))
    assert record["subject"] == "ada" and on > off + 0.05, (on, off)
    with pytest.raises(LimnerError, match="storymaker personalizes a person; .*ada, ben"):
        run_demo(tmp_path / "object", subject_name="world:duo_ball", method_name="storymaker", device="cpu")
