"""DreamBooth (full and LoRA) on a tiny random pipeline: prior preservation modes, the files plain
diffusers loads, and bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import db_train, subject

from limner.errors import LimnerError
from limner.methods import get_method
from limner.models.loading import load_base


@pytest.mark.parametrize("prior", ["class_images", "frozen", "none"])
def test_dreambooth_lora_prior_modes_and_interop(tiny_base, tmp_path, prior):
    from diffusers import StableDiffusionPipeline

    base = load_base(str(tiny_base), device="cpu")
    out = get_method("dreambooth_lora").personalize(base, subject(), tmp_path / "c", train=db_train(), prior_preservation=prior,
                                                   num_class_images=3, class_image_steps=2, class_image_cache=str(tmp_path / "cls"))
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
        return pipe("a sks ball", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    plain = run(None)
    with_diffusers = run(lambda p: p.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors"))
    with_kohya = run(lambda p: p.load_lora_weights(str(out), weight_name="lora_kohya.safetensors"))
    assert not np.allclose(plain, with_diffusers, atol=1e-4), "the LoRA changes the output"
    assert np.allclose(with_diffusers, with_kohya, atol=2e-3), "the kohya export is the same LoRA"


def test_dreambooth_full_saves_a_pipeline_that_plain_diffusers_loads(tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = load_base(str(tiny_base), device="cpu")
    out = get_method("dreambooth").personalize(base, subject(), tmp_path / "c", train=db_train(), prior_preservation="none")
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe("a sks ball", num_inference_steps=1, output_type="np").images.shape == (1, 16, 16, 3)
    fresh = load_base(str(tiny_base), device="cpu")
    before = next(fresh.pipe.unet.parameters()).detach().clone()
    get_method("dreambooth").install(fresh, [out])
    assert not torch.equal(before, next(fresh.pipe.unet.parameters()).detach().float())


def test_dreambooth_rejects_bad_rank(tiny_base, tmp_path):
    with pytest.raises(LimnerError, match="rank"):
        get_method("dreambooth_lora").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "c", lora_rank=0)
