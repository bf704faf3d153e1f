"""The same methods on an SDXL-layout base (two text encoders): tiny random weights, real code paths."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
from safetensors.torch import load_file

from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.models.loading import load_base
from limner.training import TrainConfig


def subject():
    rng = np.random.default_rng(0)
    return Subject("blob", "ball", [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2)])


def train_cfg():
    return TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2, weight_decay=0.0, checkpoint_every=0)


def test_sdxl_base_generates(tiny_sdxl):
    base = load_base(str(tiny_sdxl), device="cpu")
    assert base.family == "sdxl"
    assert generate(base, GenerationSettings("a red ball", num_images=1, steps=2)).images[0].size == (16, 16)


def test_textual_inversion_on_sdxl_writes_clip_l_and_clip_g(tiny_sdxl, tmp_path):
    out = get_method("textual_inversion").personalize(
        load_base(str(tiny_sdxl), device="cpu"), subject(), tmp_path / "ti", train=train_cfg()
    )
    a1111 = load_file(str(out / "s-star.safetensors"))  # named after the token <s*>, A1111's trigger word
    assert a1111["clip_l"].shape == (4, 32) and a1111["clip_g"].shape == (4, 32)
    assert load_file(str(out / "learned_embeds_2.safetensors"))["<s*>"].shape == (4, 32)
    # a concept written before the file was named after its token has embedding.safetensors: it installs too
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    (legacy / "s-star.safetensors").rename(legacy / "embedding.safetensors")
    manifest = json.loads((legacy / "limner.json").read_text())
    (legacy / "limner.json").write_text(
        json.dumps(manifest | {"files": manifest["files"] | {"a1111": "embedding.safetensors"}})
    )
    for concept in (out, legacy):
        base = load_base(str(tiny_sdxl), device="cpu")
        get_method("textual_inversion").install(base, [concept])
        for tok, te in (
            (base.pipe.tokenizer, base.pipe.text_encoder),
            (base.pipe.tokenizer_2, base.pipe.text_encoder_2),
        ):
            row = te.get_input_embeddings().weight[tok.convert_tokens_to_ids("<s*>")]
            assert torch.allclose(
                row, a1111["clip_l" if te is base.pipe.text_encoder else "clip_g"][0].float(), atol=1e-3
            )
    assert generate(base, GenerationSettings("a <s*> on the beach", num_images=1, steps=2)).images


def test_dreambooth_lora_with_prior_and_custom_diffusion_on_sdxl(tiny_sdxl, tmp_path):
    base = load_base(str(tiny_sdxl), device="cpu")
    out = get_method("dreambooth_lora").personalize(
        base,
        subject(),
        tmp_path / "db",
        train=train_cfg(),
        num_class_images=2,
        class_image_steps=2,
        class_image_cache=str(tmp_path / "cls"),
    )
    fresh = load_base(str(tiny_sdxl), device="cpu")
    get_method("dreambooth_lora").install(fresh, [out])
    assert generate(fresh, GenerationSettings("a sks ball", num_images=1, steps=2)).images
    cd = get_method("custom_diffusion").personalize(
        load_base(str(tiny_sdxl), device="cpu"),
        subject(),
        tmp_path / "cd",
        prior_preservation=False,
        augment_variants=2,
        train=train_cfg(),
    )
    state = load_file(str(cd / "<new1>.safetensors"))
    assert set(state) == {"clip_l", "clip_g"}
    fresh = load_base(str(tiny_sdxl), device="cpu")
    get_method("custom_diffusion").install(fresh, [cd])
    assert generate(fresh, GenerationSettings("a <new1> ball", num_images=1, steps=2)).images
