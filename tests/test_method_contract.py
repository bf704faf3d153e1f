"""The contract every method keeps, and a new method plugging in by registering itself.

Each registered method (and a toy one defined here) personalizes on a tiny base; its concept installs,
changes what is drawn, and uninstalls back to the base bit for bit; its eval cache key is stable; bad
settings fail naming the setting. The toy method, a fixed prompt-embedding offset registered from
this file, also runs through `limner generate` and `limner eval` with no change to either.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ToyStream, tiny_image_encoder
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from limner.cli import app
from limner.concepts import read_manifest, write_model_card
from limner.conditioning import apply_concepts
from limner.errors import LimnerError
from limner.evaluation.cache_keys import concept_key
from limner.generation import GenerationSettings, generate
from limner.io import write_json_atomic
from limner.methods import REGISTRY, Installation, Subject, get_method, method_names, register
from limner.methods.adapter import AdapterMethod, adapter_fingerprint, write_adapter_manifest
from limner.models.loading import load_base
from limner.training import TrainConfig


class PromptOffset(AdapterMethod):
    """A toy encoder method: pretraining fits a map from a picture's mean colour to a prompt-embedding
    offset; encoding a subject applies it to the references. It conditions generation through per-call
    pipeline arguments only, as the encoder methods do."""

    name = "prompt_offset"
    family = "encoder"

    def pretrain(self, base, data, out, **settings):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        width = base.pipe.text_encoder.config.hidden_size
        projection = torch.randn(width, 3, generator=torch.Generator().manual_seed(int(settings.get("seed", 0))))
        save_file({"projection": projection.contiguous()}, str(out / "projection.safetensors"))
        write_adapter_manifest(out, self.name, base, data=str(data), steps=0)
        return out

    def encode(self, base, adapter, subject, out, **settings):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        colour = torch.tensor(np.mean([im.reshape(-1, 3).mean(0) for im in subject.images], axis=0) / 255.0).float()
        offset = (
            load_file(str(Path(adapter) / "projection.safetensors"))["projection"]
            @ colour
            * float(settings.get("strength", 0.3))
        )
        save_file({"offset": offset.contiguous()}, str(out / "offset.safetensors"))
        manifest = {
            "method": self.name,
            "subject": subject.name,
            "class_noun": subject.class_noun,
            "tokens": [],
            "base_fingerprint": base.fingerprint,
            "base_path": str(base.path),
            "steps": 0,
            "config": settings,
            "adapter": str(adapter),
            "adapter_fingerprint": adapter_fingerprint(adapter),
        }
        write_json_atomic(out / "limner.json", manifest)
        write_model_card(out, manifest)
        return out

    def install(self, base, concepts, regions=None):
        return Installation()  # nothing to install: the offset rides on each call

    def condition(self, base, concepts, prompt):
        pipe = base.pipe
        embeds = pipe.encode_prompt(prompt, pipe.device, 1, False)[0]
        offset = sum(load_file(str(Path(c) / "offset.safetensors"))["offset"] for c in concepts)
        return {"prompt_embeds": embeds + offset.to(embeds)}

    def prompt(self, template, concept):
        return template.format(read_manifest(concept)["class_noun"])


@pytest.fixture
def toy_method():
    register(PromptOffset)
    yield PromptOffset
    REGISTRY.pop(PromptOffset.name)


def blob(n: int = 2) -> Subject:
    rng = np.random.default_rng(0)
    return Subject("blob", "ball", [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)])


def person(n: int = 2) -> Subject:
    """Portraits of a held-out world person: what an identity method's references must show (a face)."""
    from limner.evaluation.subjects import world_subjects

    (ada,) = world_subjects("world:ada")
    return Subject("ada", ada.class_noun, list(ada.images[:n]))


def subject_for(method) -> Subject:
    return person() if method.capabilities.needs_faces else blob()


QUICK = TrainConfig(max_steps=2, batch_size=1, learning_rate=1e-2, checkpoint_every=0)
# per method: settings for a run of seconds, a bad value that must fail naming its setting, and a prompt
CASES = {
    "textual_inversion": ({"train": QUICK, "num_vectors": 1}, ("num_vectors", 0), "a <s*> on the beach"),
    "dreambooth": ({"train": QUICK, "prior_preservation": "none"}, ("prior_preservation", "sometimes"), "a sks ball"),
    "dreambooth_lora": ({"train": QUICK, "prior_preservation": "none"}, ("lora_rank", 0), "a sks ball"),
    "custom_diffusion": (
        {"train": QUICK, "prior_preservation": False, "augment": False},
        ("mode", "everything"),
        "a <new1> ball",
    ),
    "prompt_offset": ({}, ("adapter", "/no/such/adapter"), "a ball"),  # a bad adapter folder fails naming it
    "ip_adapter": ({}, ("scale", -1.0), "a ball"),
    "blip_diffusion": ({}, ("prompt_reps", 0), "a ball on the beach"),
    "fastcomposer": ({}, ("alpha", 0), "a ball <|image|> on the beach"),
    "photomaker": ({}, ("merge_ratio", 1.5), "a portrait of a woman img on the beach"),
    "storymaker": ({}, ("scale", -1.0), "a portrait of a woman on the beach"),
    "instantid": ({}, ("controlnet_scale", -1.0), "a portrait of a woman on the beach"),
}


def pretrain(method, base, out, folder, seed=0):
    """An encoder method's adapter for the tiny base: the toy's from nothing, IP-Adapter's from a step on a tiny
    stream with a tiny image encoder (the tiny base has none)."""
    if method.name == "instantid":  # world portraits (faces), no image encoder: a Resampler of one head
        return method.pretrain(base, "world", out, resampler_dim=64, max_steps=1, batch_size=1, seed=seed)
    if method.name not in ("ip_adapter", "blip_diffusion", "fastcomposer", "photomaker", "storymaker"):
        return method.pretrain(base, "toy", out, **({"seed": seed} if seed else {}))
    encoder = folder / "image_encoder"
    if not encoder.exists():
        tiny_image_encoder(encoder)
    quick = {"max_steps": 1, "batch_size": 1, "checkpoint_every": 0, "seed": seed}
    if method.name == "blip_diffusion":  # one step of each stage, a Q-Former of one small layer
        quick |= {"stage1_steps": 1, "qformer_layers": 1, "qformer_intermediate": 64, "batch_size": 2}
    if method.name in ("fastcomposer", "photomaker", "storymaker"):  # world scenes (people): each subject's mask, noun
        return method.pretrain(base, "world", out, image_encoder=str(encoder), **quick)
    return method.pretrain(base, ToyStream(n=1), out, image_encoder=str(encoder), **quick)


def draw(base, prompt: str, conditioning=None) -> np.ndarray:
    s = GenerationSettings(prompt, num_images=1, steps=2, batch_size=1)
    return np.asarray(generate(base, s, conditioning=conditioning).images[0])


def test_every_registered_method_has_a_contract_case():
    assert set(method_names()) <= set(CASES), "add the new method to CASES so the contract covers it"


@pytest.mark.parametrize("name", list(CASES))
def test_method_contract(name, tiny_base, tmp_path, toy_method):
    method = get_method(name)
    settings, bad, prompt = CASES[name]
    if method.capabilities.needs_adapter:  # pretrained once per base, then every subject is encoded with it
        settings = settings | {
            "adapter": pretrain(method, load_base(str(tiny_base), device="cpu"), tmp_path / "adapter", tmp_path)
        }
    concept = method.personalize(
        load_base(str(tiny_base), device="cpu"), subject_for(method), tmp_path / "c", **settings
    )
    manifest = read_manifest(concept)
    assert (
        manifest["method"] == name
        and manifest["base_fingerprint"] == load_base(str(tiny_base), device="cpu").fingerprint
    )
    assert method.family in ("tuning", "encoder", "identity")

    # installed, the concept changes the picture; uninstalled, the base draws exactly what it drew before
    base = load_base(str(tiny_base), device="cpu")
    before = draw(base, prompt)
    with apply_concepts(base, [concept]) as applied:
        during = draw(base, prompt, applied.condition(prompt, 2))
    assert not np.array_equal(before, during), "the concept must change what is drawn"
    assert np.array_equal(before, draw(base, prompt)), "uninstalling must give the base back bit for bit"

    # the eval cache key is stable, and a setting changes it
    assert concept_key(method, {}, "s", "b") == concept_key(get_method(name), {}, "s", "b")
    changed = {"strength": 2.0} if name == "prompt_offset" else {"max_steps": 7}
    assert concept_key(method, changed, "s", "b") != concept_key(method, {}, "s", "b")
    if "adapter" in settings:  # keyed by the adapter's content, not its path
        other = pretrain(method, load_base(str(tiny_base), device="cpu"), tmp_path / "other", tmp_path, seed=1)
        assert concept_key(method, settings, "s", "b") != concept_key(method, {"adapter": other}, "s", "b")

    # bad settings fail before any work, naming the setting
    if bad is not None:
        key, value = bad
        with pytest.raises(LimnerError, match=key):
            method.personalize(
                load_base(str(tiny_base), device="cpu"),
                subject_for(method),
                tmp_path / "bad",
                **(settings | {key: value}),
            )
    if method.config_cls is not None:
        with pytest.raises(LimnerError, match="no setting 'colour_of_the_sky'"):
            method.personalize(
                load_base(str(tiny_base), device="cpu"), subject_for(method), tmp_path / "bad2", colour_of_the_sky=1
            )


def test_a_registered_method_runs_in_generate_and_eval_unchanged(toy_method, tmp_path):
    """The toy method was never named anywhere in limner: `limner generate --concept` and `limner eval
    --method` run it through the one conditioning path."""
    from limner.evaluation.subjects import world_subjects

    (subject,) = world_subjects("world:duo_ball")
    method = get_method("prompt_offset")
    adapter = method.pretrain(load_base(), "world", tmp_path / "adapter")
    concept = method.personalize(load_base(), subject, tmp_path / "toy", adapter=adapter)
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "generate",
            "a ball on the beach",
            "-n",
            "1",
            "--steps",
            "2",
            "--concept",
            str(concept),
            "--out",
            str(tmp_path / "gen"),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app, ["generate", "a ball on the beach", "-n", "1", "--steps", "2", "--out", str(tmp_path / "plain")]
    )
    assert r.exit_code == 0, r.output
    with_offset, plain = (
        np.asarray(__import__("PIL.Image").Image.open(next((tmp_path / d).glob("*-00.png")))) for d in ("gen", "plain")
    )
    assert not np.array_equal(with_offset, plain)
    r = runner.invoke(
        app,
        [
            "eval",
            "--method",
            f"prompt_offset:adapter={adapter}",
            "--subjects",
            "world:duo_ball",
            "--prompts",
            "1",
            "-n",
            "1",
            "--steps",
            "2",
            "--no-bounds",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "report"),
        ],
    )
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    (row,) = results["rows"].values()
    assert "subject_fidelity" in row["mean"]
    assert row["concepts"]["duo_ball"]["adapter_fingerprint"] == adapter_fingerprint(adapter)


def test_limner_methods_lists_every_method_and_explains_its_settings(toy_method):
    runner = CliRunner()
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and all(name in r.output for name in method_names())
    assert "prompt_offset" in r.output and "joint" in r.output  # Custom Diffusion trains jointly
    r = runner.invoke(app, ["methods", "textual_inversion"])
    assert r.exit_code == 0 and "num_vectors = 4" in r.output and "max_steps=400" in r.output
    r = runner.invoke(app, ["methods", "no_such_method"])
    assert r.exit_code == 2 and "available" in r.output


# names that are also keys of a file format, not a method looked up: the official IP-Adapter file's "ip_adapter"
# entry ({"image_proj": ..., "ip_adapter": ...}), which the shared IP attention layer reads
FORMAT_KEYS = {("adapters/ip_attention.py", "ip_adapter")}


def test_no_module_outside_methods_names_a_method():
    """Adding a method changes nothing outside limner.methods: no other module compares with, branches on
    or looks up a method by its name (the demo's one choice of method excepted)."""
    import ast

    import limner

    root = Path(limner.__file__).parent
    names = set(method_names())
    found = []
    for path in root.rglob("*.py"):
        if "methods" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                if (path.relative_to(root).as_posix(), node.value) in FORMAT_KEYS:
                    continue
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    assert len(found) == 1 and found[0].startswith("demo.py:"), found


def test_a_crash_while_writing_the_model_card_leaves_the_previous_card(tmp_path, monkeypatch):
    manifest = {"method": "toy", "subject": "blob", "class_noun": "ball", "tokens": ["<t>"], "steps": 2}
    write_model_card(tmp_path, manifest)
    before = (tmp_path / "README.md").read_text()

    def half_then_crash(self, text, *args, **kwargs):  # the process dies halfway through the write
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        write_model_card(tmp_path, manifest | {"steps": 400})
    monkeypatch.undo()
    assert (tmp_path / "README.md").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"], "no half-written file is left beside it"
