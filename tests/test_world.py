"""The procedural world: determinism, ground truth, captions and what is held out of training."""

from __future__ import annotations

import re

import numpy as np
import pytest

from limner.world import vocab
from limner.world.bench import (
    IDENTITIES,
    SUBJECTS,
    heldout_identity_keys,
    identity_references,
    object_prompts,
    subject_references,
)
from limner.world.render import CharacterSpec, ObjectSpec, Scene, render
from limner.world.scenes import heldout_combos, is_heldout_combo, near_heldout_subject, random_render, random_scene
from limner.world.stack import build_tokenizer


def test_render_is_deterministic():
    a, b = random_render(123), random_render(123)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, random_render(124).image)


@pytest.mark.parametrize("seed", range(40))
def test_ground_truth_is_consistent(seed):
    r = random_render(seed)
    assert r.image.shape == (64, 64, 3) and r.image.dtype == np.uint8
    for e in r.entities:
        assert e.mask.shape == (64, 64) and e.mask.sum() > 4, "every entity is visible"
        x0, y0, x1, y1 = e.bbox
        inside = np.zeros_like(e.mask)
        inside[y0:y1, x0:x1] = True
        assert not (e.mask & ~inside).any(), "the mask lies inside the bbox"
        assert e.mask[y0].any() and e.mask[y1 - 1].any() and e.mask[:, x0].any() and e.mask[:, x1 - 1].any(), (
            "the bbox is tight"
        )
        assert re.search(rf"\b{e.cls}\b", r.caption), "the caption names every entity's class"
        if e.kind == "character":
            fx, fy = e.face_keypoints[:, 0], e.face_keypoints[:, 1]
            assert ((fx >= x0 - 1) & (fx <= x1 + 1) & (fy >= y0 - 1) & (fy <= y1 + 1)).all(), (
                "face keypoints lie on the character"
            )
            assert e.identity is not None
    others = [phrase for ctx, phrase in vocab.CONTEXTS.items() if ctx != r.context]
    assert not any(phrase in r.caption for phrase in others), "the caption never names another context"


def test_entity_pixels_take_the_named_colour():
    spec = ObjectSpec("ball", "blue", x=0.5, y=0.5, scale=0.35)
    r = render(Scene("snow", [spec]))
    pixels = r.image[r.entities[0].mask].astype(float)
    assert np.abs(np.median(pixels, 0) - np.array(vocab.COLOURS["blue"])).max() < 30


def test_two_entities_left_and_right():
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = random_scene(rng)
        if len(s.entities) == 2:
            r = render(s)
            assert "on the left" in s.caption and "on the right" in s.caption
            cx = [np.nonzero(e.mask)[1].mean() for e in r.entities]
            assert cx[0] < cx[1]


def test_training_distribution_excludes_heldout_subjects_identities_and_combos():
    rng = np.random.default_rng(1)
    held = heldout_identity_keys()
    assert len(heldout_combos()) > 40
    for _ in range(3000):
        s = random_scene(rng)
        for e in s.entities:
            if isinstance(e, ObjectSpec):
                assert e.subject is None
                if len(s.entities) == 1:
                    assert not is_heldout_combo(e.cls, e.colour, s.context)
            else:
                assert e.identity.key() not in held


def test_two_tone_instances_are_named_in_captions_but_never_near_a_heldout_subject():
    from dataclasses import replace

    rng = np.random.default_rng(3)
    words = set(vocab.caption_words())
    instances = []
    for _ in range(2000):
        s = random_scene(rng, instance_rate=0.6)
        assert set(s.caption.split()) <= words, s.caption
        o = s.entities[0]
        if isinstance(o, ObjectSpec) and o.subject is not None:
            assert not near_heldout_subject(o.subject) and o.subject.emblem_colour not in (
                o.subject.colour_a,
                o.subject.colour_b,
            )
            instances.append((o.subject, s.caption))
    assert len(instances) > 300
    assert len({(i.cls, i.emblem) for i, _ in instances}) == len(vocab.OBJECT_CLASSES) * len(vocab.EMBLEMS)
    named = [
        c for i, c in instances if f"{i.colour_a} and {i.colour_b} {i.cls} with a {i.emblem_colour} {i.emblem}" in c
    ]
    assert 0.5 < len(named) / len(instances) < 0.9, "most captions name the looks, some do not"
    for subject in SUBJECTS:  # a subject, or any one-look change of it, is out of the training distribution
        assert near_heldout_subject(subject)
        assert near_heldout_subject(replace(subject, emblem="ring" if subject.emblem != "ring" else "heart"))
        assert near_heldout_subject(replace(subject, colour_a=subject.colour_b, colour_b=subject.colour_a))


def test_bench_has_references_and_prompts():
    assert len(SUBJECTS) >= 12 and len(IDENTITIES) >= 8
    assert (
        len(vocab.CONTEXTS) >= 8
        and len(vocab.OBJECT_CLASSES) >= 8
        and len(vocab.COLOURS) >= 10
        and len(vocab.PATTERNS) >= 4
    )
    refs = subject_references(SUBJECTS[0])
    assert len(refs) == 5 and len({r.context for r in refs}) == 5
    assert all(r.entities[0].attributes["subject"] == SUBJECTS[0].name for r in refs)
    assert np.array_equal(refs[0].image, subject_references(SUBJECTS[0])[0].image)
    ids = identity_references(IDENTITIES[0])
    assert {r.entities[0].identity for r in ids} == {IDENTITIES[0].name}
    kinds = {p.kind for p in object_prompts()}
    assert kinds == {"recontextualisation", "accessorisation", "property"}


def test_captions_use_only_vocabulary_words_so_identity_is_never_named():
    rng = np.random.default_rng(2)
    words = set(vocab.caption_words())
    seen_characters = 0
    for _ in range(500):
        s = random_scene(rng)
        assert set(s.caption.split()) <= words, s.caption
        seen_characters += any(isinstance(e, CharacterSpec) for e in s.entities)
    assert seen_characters > 100
    assert not {"glasses", "earrings", "headband", "hair", "eyes", "skin", "nose", "mouth"} & words


def test_tokenizer_keeps_world_words_whole_and_round_trips(tmp_path):
    from transformers import CLIPTokenizer

    tok = build_tokenizer()
    for w in vocab.caption_words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a red striped ball with a hat on the left and a sks dog on the right in the desert"
    assert again(text).input_ids == tok(text).input_ids
    assert len(tok("a banana", add_special_tokens=False).input_ids) > 2, "unknown words still tokenize, in pieces"


def test_world_build_runs_every_stage_resumes_and_exports_a_diffusers_folder(tmp_path):
    """A toy-sized build (seconds): the same stages as the real one, then a rerun that does no work."""
    import json

    import torch
    from diffusers import StableDiffusionPipeline

    from limner.world.build import BuildConfig, build

    cfg = BuildConfig(
        dataset_size=64,
        clip_steps=2,
        clip_batch=16,
        vae_steps=2,
        vae_batch=8,
        unet_steps=3,
        unet_batch=4,
        unet_warmup=1,
        instance_dataset_size=32,
        instance_steps=2,
        instance_warmup=1,
        instance_restart_steps=2,
        checkpoint_every=2,
        probe_steps=2,
        probe_train_size=64,
    )
    torch.set_num_threads(1)
    record = build(tmp_path / "world", tmp_path / "work", cfg, device="cpu")
    assert {"data", "clip", "vae", "latents", "unet", "instances", "instances_restart", "probes", "export"} <= set(
        record["seconds"]
    )
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "world" / "base")
    assert pipe("a ball", num_inference_steps=1, output_type="np").images.shape == (1, 64, 64, 3)
    assert (tmp_path / "world" / "probes" / "subject.safetensors").exists()
    ckpt = tmp_path / "work" / "unet" / "checkpoints" / "step-000003" / "trainable.safetensors"
    mtime = ckpt.stat().st_mtime
    build(tmp_path / "world", tmp_path / "work", cfg, device="cpu")
    assert ckpt.stat().st_mtime == mtime, "a finished stage is not trained again"
    assert json.loads((tmp_path / "world" / "base" / "build.json").read_text())["config"]["unet_steps"] == 3
    assert set(record["loss"]) >= {"clip", "vae", "unet", "instances", "instances_restart", "probe_subject"}


def test_world_build_stage_resumes_where_it_stopped(tmp_path):
    """An interrupted stage goes on from its newest checkpoint: the UNet (and its EMA) come out as in an
    uninterrupted build, and a work folder of the old loop is refused instead of silently retrained."""
    import torch
    from safetensors.torch import load_file

    from limner.errors import LimnerError
    from limner.world import build as world_build
    from limner.world.build import BuildConfig, build

    cfg = BuildConfig(
        dataset_size=48,
        clip_steps=2,
        clip_batch=8,
        vae_steps=2,
        vae_batch=4,
        unet_steps=4,
        unet_batch=4,
        unet_warmup=1,
        instance_steps=0,
        checkpoint_every=2,
        probe_steps=1,
        probe_train_size=32,
    )
    torch.set_num_threads(1)
    straight = build(tmp_path / "a", tmp_path / "work-a", cfg, device="cpu")

    # the probes do not depend on the UNet: build b reuses build a's (they are the slow part of a toy build)
    import shutil

    (tmp_path / "work-b").mkdir()
    shutil.copytree(tmp_path / "work-a" / "probes", tmp_path / "work-b" / "probes")
    real_train, drawn = world_build.train, []

    def train_until_interrupted(task, next_batch, settings, out, desc="train", validate=None):
        def batches(g):
            drawn.append(desc)
            if drawn.count("unet") == 3:  # the UNet's third step, after its checkpoint at step 2
                raise KeyboardInterrupt
            return next_batch(g)

        return real_train(task, batches, settings, out, desc=desc, validate=validate)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(world_build, "train", train_until_interrupted)
        with pytest.raises(KeyboardInterrupt):
            build(tmp_path / "b", tmp_path / "work-b", cfg, device="cpu")
    assert not (tmp_path / "b" / "base").exists()
    resumed = build(tmp_path / "b", tmp_path / "work-b", cfg, device="cpu")

    def trained(record: dict) -> dict:  # the stages build b trained itself
        return {k: v for k, v in record["loss"].items() if not k.startswith("probe_")}

    assert trained(resumed) == trained(straight)
    a, b = (load_file(str(tmp_path / w / "base" / "unet" / "diffusion_pytorch_model.safetensors")) for w in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the exported (EMA) UNet is the uninterrupted build's"

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "clip.ckpt").write_bytes(b"")
    with pytest.raises(LimnerError, match="older build"):
        build(tmp_path / "c", tmp_path / "old", cfg, device="cpu")
