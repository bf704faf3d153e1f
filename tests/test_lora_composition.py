"""A method that carries its own UNet LoRA (PhotoMaker, StoryMaker, FastComposer, BLIP-Diffusion) composes with
LoRA concepts drawn beside it: the DreamBooth LoRAs keep acting, at their weights, while the method's LoRA acts, and
once the method's concept is taken away the UNet is exactly what it was with the LoRA concepts alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from limner.conditioning import apply_concepts
from limner.evaluation.subjects import world_subjects
from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.models.loading import load_base
from limner.training import TrainConfig

TEMPLATE = "a portrait of a {} on the beach"


@pytest.fixture(scope="module")
def ada():
    (s,) = world_subjects("world:ada")
    return Subject("ada", s.class_noun, list(s.images[:2]))


@pytest.fixture(scope="module")
def lora_concepts(ada, tmp_path_factory):
    """Two DreamBooth LoRA concepts of the world base (2 steps at a high rate, so each visibly changes the UNet)."""
    folder = tmp_path_factory.mktemp("dreambooth")
    train = TrainConfig(max_steps=2, batch_size=1, learning_rate=5e-2, checkpoint_every=0)
    return [
        get_method("dreambooth_lora").personalize(
            load_base(None, device="cpu"), ada, folder / word, identifier=word, prior_preservation="none", train=train
        )
        for word in ("zwx", "qvx")
    ]


@pytest.fixture(scope="module")
def world():
    return load_base(None, device="cpu")


def draw(world, applied, prompt: str) -> np.ndarray:
    settings = GenerationSettings(prompt, num_images=1, steps=2, seed=3)
    return np.asarray(generate(world, settings, conditioning=applied.condition(prompt, 2)).images[0])


def adapters(unet) -> dict[str, tuple[list[str], dict[str, float]]]:
    """Each LoRA layer's active adapters and their scales."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name: (list(m.active_adapters), {k: float(v) for k, v in m.scaling.items()})
        for name, m in unet.named_modules()
        if isinstance(m, BaseTunerLayer)
    }


@pytest.mark.parametrize("method", ["photomaker", "storymaker", "fastcomposer", "blip_diffusion"])
def test_lora_concepts_act_beside_the_methods_lora_and_are_as_before_once_it_leaves(
    world, ada, lora_concepts, method, tmp_path
):
    unet = world.pipe.unet
    pristine = {k: v.clone() for k, v in unet.state_dict().items()}
    options = {"num_references": 1} if method == "photomaker" else {}
    concept = get_method(method).personalize(world, ada, tmp_path / method, **options)
    prompt = get_method(method).prompt(TEMPLATE, concept)
    with apply_concepts(world, [concept]) as applied:
        method_alone = draw(world, applied, prompt)

    with apply_concepts(world, lora_concepts) as with_loras:
        names = list(dict.fromkeys(a for active, _ in adapters(unet).values() for a in active))
        world.pipe.set_adapters(names, adapter_weights=[0.5, 0.7])  # a user's weights, to be kept
        loras_alone, layers = draw(world, with_loras, prompt), adapters(unet)
        state = {k: v.clone() for k, v in unet.state_dict().items()}

        with apply_concepts(world, [concept]) as applied:
            both = draw(world, applied, prompt)
            for name, (active, scales) in adapters(unet).items():
                if name in layers:  # the LoRA concepts still active, at the user's weights
                    assert set(names) <= set(active), f"{name} runs only {active}"
                    assert {k: scales[k] for k in names} == layers[name][1]
        assert not np.array_equal(both, method_alone), "the LoRA concepts changed nothing beside the method"

        assert adapters(unet) == layers, "the LoRA concepts' active set and weights put back"
        after = unet.state_dict()
        assert set(after) == set(state), "peft's wrappers gone where the method's LoRA was alone"
        assert all(torch.equal(after[k], state[k]) for k in state)
        assert np.array_equal(draw(world, with_loras, prompt), loras_alone)

    after = unet.state_dict()
    assert set(after) == set(pristine) and all(torch.equal(after[k], pristine[k]) for k in pristine)


def test_drawn_together_the_lora_concept_installs_first_and_both_act(world, ada, lora_concepts, tmp_path):
    """One `--concept` of each, in either order: the same picture, unlike the PhotoMaker concept's alone."""
    concept = get_method("photomaker").personalize(world, ada, tmp_path / "photomaker", num_references=1)
    prompt = get_method("photomaker").prompt(TEMPLATE, concept)
    with apply_concepts(world, [concept]) as applied:
        alone = draw(world, applied, prompt)
    with apply_concepts(world, [concept, lora_concepts[0]]) as applied:
        together = draw(world, applied, prompt)
    with apply_concepts(world, [lora_concepts[0], concept]) as applied:
        assert np.array_equal(draw(world, applied, prompt), together)
    assert not np.array_equal(together, alone)
