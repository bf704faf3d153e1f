"""DreamBooth (full and LoRA) on a tiny random pipeline: prior preservation modes, the files plain
diffusers loads, and bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import db_train, subject

from limner.errors import LimnerError
from limner.methods import get_method
from limner.models.loading import load_base


def peft_refused_by_transformers() -> str | None:
    """Why transformers' peft integration (which adds and loads a text encoder's LoRA) refuses the
    installed peft, or None; read here, not from limner, so the test does not trust the code it checks."""
    from importlib.metadata import version

    from packaging.version import Version
    from transformers.integrations import peft as integration

    need, have = integration.MIN_PEFT_VERSION, version("peft")
    return (
        f"transformers {version('transformers')} wants peft >= {need}, installed {have}"
        if Version(have) < Version(need)
        else None
    )


@pytest.mark.parametrize("prior", ["class_images", "frozen", "none"])
def test_dreambooth_lora_prior_modes_and_interop(tiny_base, tmp_path, prior):
    from diffusers import StableDiffusionPipeline

    base = load_base(str(tiny_base), device="cpu")
    out = get_method("dreambooth_lora").personalize(
        base,
        subject(),
        tmp_path / "c",
        train=db_train(),
        prior_preservation=prior,
        num_class_images=3,
        class_image_steps=2,
        class_image_cache=str(tmp_path / "cls"),
    )
    assert (out / "pytorch_lora_weights.safetensors").exists() and (out / "lora_kohya.safetensors").exists()
    if prior == "class_images":
        assert len(list((tmp_path / "cls").rglob("*.png"))) == 3
    if prior != "none":
        return

    def run(load):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
        pipe.set_progress_bar_config(disable=True)
        if load:
            load(pipe)
        return pipe(
            "a sks ball", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images

    plain = run(None)
    with_diffusers = run(lambda p: p.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors"))
    with_kohya = run(lambda p: p.load_lora_weights(str(out), weight_name="lora_kohya.safetensors"))
    assert not np.allclose(plain, with_diffusers, atol=1e-4), "the LoRA changes the output"
    assert np.allclose(with_diffusers, with_kohya, atol=2e-3), "the kohya export is the same LoRA"


def test_dreambooth_full_saves_a_pipeline_that_plain_diffusers_loads(tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = load_base(str(tiny_base), device="cpu")
    out = get_method("dreambooth").personalize(
        base, subject(), tmp_path / "c", train=db_train(), prior_preservation="none"
    )
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe("a sks ball", num_inference_steps=1, output_type="np").images.shape == (1, 16, 16, 3)
    fresh = load_base(str(tiny_base), device="cpu")
    before = next(fresh.pipe.unet.parameters()).detach().clone()
    get_method("dreambooth").install(fresh, [out])
    assert not torch.equal(before, next(fresh.pipe.unet.parameters()).detach().float())


def test_dreambooth_rejects_bad_rank(tiny_base, tmp_path):
    with pytest.raises(LimnerError, match="rank"):
        get_method("dreambooth_lora").personalize(
            load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "c", lora_rank=0
        )


def test_to_kohya_takes_the_text_encoders_keys_and_names_them_as_kohya_does():
    from limner.adapters.lora import to_kohya

    down, up = torch.ones(2, 8), torch.ones(8, 2)
    state = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": down,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": up,
        # diffusers' converted text-encoder keys: transformers 5 has no `text_model.` level, 4 has
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": down,
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": up,
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_linear_layer.down.weight": down,
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_linear_layer.up.weight": up,
    }
    out = to_kohya(state, 4)
    for name in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj",
    ):
        assert torch.equal(out[f"{name}.lora_down.weight"], down) and torch.equal(out[f"{name}.lora_up.weight"], up)
        assert float(out[f"{name}.alpha"]) == 4.0
    assert len(out) == 9


def test_dreambooth_lora_trains_the_text_encoder_and_plain_diffusers_loads_both_files(tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    if reason := peft_refused_by_transformers():
        pytest.skip(f"the text encoder's LoRA needs another peft here: {reason}")
    out = get_method("dreambooth_lora").personalize(
        load_base(str(tiny_base), device="cpu"),
        subject(),
        tmp_path / "c",
        train=db_train(),
        prior_preservation="none",
        train_text_encoder=True,
    )
    assert (out / "limner.json").exists()
    kohya = load_file(str(out / "lora_kohya.safetensors"))
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in kohya)
    assert any(k.startswith("lora_unet_") for k in kohya)

    def text_output(weight_name):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
        if weight_name:
            pipe.load_lora_weights(str(out), weight_name=weight_name)
        ids = pipe.tokenizer(
            ["a sks ball"], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]

    plain = text_output(None)
    with_diffusers, with_kohya = text_output("pytorch_lora_weights.safetensors"), text_output("lora_kohya.safetensors")
    assert not torch.allclose(plain, with_diffusers, atol=1e-5), "the text encoder's LoRA changes its output"
    assert torch.allclose(with_diffusers, with_kohya, atol=2e-3), "the kohya export holds the same text-encoder LoRA"


def test_text_encoder_lora_refused_up_front_where_transformers_refuses_peft(tiny_base, tmp_path, monkeypatch):
    from transformers.integrations import peft as integration

    if (
        not peft_refused_by_transformers()
    ):  # make this stack one that refuses, as transformers >= 5.24 with peft 0.21 does
        monkeypatch.setattr(integration, "MIN_PEFT_VERSION", "99.0.0")
    classes = tmp_path / "cls"
    with pytest.raises(LimnerError, match=r"train_text_encoder.*peft >= \S+.*installed.*peft \S+"):
        get_method("dreambooth_lora").personalize(
            load_base(str(tiny_base), device="cpu"),
            subject(),
            tmp_path / "c",
            train=db_train(),
            train_text_encoder=True,
            num_class_images=2,
            class_image_steps=1,
            class_image_cache=str(classes),
        )
    assert not list(classes.rglob("*.png")), "refused before drawing class images or training"
    assert not (tmp_path / "c" / "limner.json").exists()
    # a concept whose text encoder has a LoRA (trained where peft was newer) gets the same clear error from install
    concept = tmp_path / "te-concept"
    concept.mkdir()
    (concept / "limner.json").write_text(
        json.dumps(
            {"method": "dreambooth_lora", "lora": True, "tokens": ["sks"], "config": {"train_text_encoder": True}}
        )
    )
    with pytest.raises(LimnerError, match=r"peft >= "):
        get_method("dreambooth_lora").install(load_base(str(tiny_base), device="cpu"), [concept])


def test_a_crash_while_diffusers_writes_the_lora_leaves_the_previous_file(tiny_base, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    def train():
        return get_method("dreambooth_lora").personalize(
            load_base(str(tiny_base), device="cpu"),
            subject(),
            tmp_path / "c",
            train=db_train(),
            prior_preservation="none",
        )

    out = train()
    lora = out / "pytorch_lora_weights.safetensors"
    before, names = lora.read_bytes(), sorted(p.name for p in out.iterdir())

    def half_then_crash(cls, save_directory, weight_name, **kwargs):  # diffusers' writer dies halfway through the file
        (Path(save_directory) / weight_name).write_bytes(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", classmethod(half_then_crash))
    with pytest.raises(KeyboardInterrupt):
        train()
    assert lora.read_bytes() == before, "the previous LoRA is intact"
    assert sorted(p.name for p in out.iterdir()) == names, "no half-written file or folder is left in the concept"


def test_class_images_drawn_differently_are_cached_apart_and_the_default_key_is_kept(tiny_base, tmp_path):
    import hashlib

    from limner.methods.dreambooth import class_images

    base, cache = load_base(str(tiny_base), device="cpu"), tmp_path / "cls"

    def folders():
        return {p.name: len(list(p.glob("*.png"))) for p in cache.iterdir()}

    default = class_images(base, "a ball", 1, 1, cache)
    # the key of today's default settings is the one every earlier cache has, so those caches keep working
    legacy = hashlib.sha256(f"{base.fingerprint}|a ball|1".encode()).hexdigest()[:16]
    assert folders() == {f"a_ball-{legacy}": 1}
    assert all(
        np.array_equal(a, b) for a, b in zip(default, class_images(base, "a ball", 1, 1, cache, guidance_scale=5.0))
    )
    assert len(folders()) == 1, "the defaults given explicitly are the same key"
    class_images(base, "a ball", 1, 1, cache, guidance_scale=7.5)
    class_images(base, "a ball", 1, 1, cache, scheduler="ddim")
    class_images(base, "a ball", 1, 1, cache, resolution=base.resolution + 8)
    class_images(base, "a ball", 1, 1, cache, negative_prompt="blurry")
    assert len(folders()) == 5 and set(folders().values()) == {1}, "each way of drawing has its own images"


def test_the_class_image_key_includes_the_precision():
    from types import SimpleNamespace

    from limner.methods.dreambooth import class_image_key

    def key(dtype):
        return class_image_key(SimpleNamespace(fingerprint="f", resolution=16, dtype=dtype), "a ball", 12)

    assert len({key(torch.float32), key(torch.float16), key(torch.bfloat16)}) == 3
