"""Several concepts at once: Custom Diffusion concepts composed instead of overwritten, LoRA and Custom
Diffusion concepts together, and each concept acting only in the regions whose prompts name it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import db_train, lora_concept, subject, two_custom_diffusion_concepts

from limner.methods import get_method
from limner.models.loading import load_base
from limner.training import TrainConfig


def test_several_custom_diffusion_concepts_compose_instead_of_overwriting(tiny_base, tmp_path):
    from limner.conditioning import apply_concepts
    from limner.generation import GenerationSettings, generate
    from limner.methods.custom_diffusion import WEIGHTS_FILE, layer_weights, merge, read_weights

    a, b = two_custom_diffusion_concepts(tiny_base, tmp_path)
    weights = {c: {k: v.float() for k, v in read_weights(c / WEIGHTS_FILE).items()} for c in (a, b)}

    def installed(base) -> dict:
        return layer_weights(base.pipe.unet, "crossattn")

    def same(x: dict, y: dict) -> bool:
        return all(torch.allclose(x[k], y[k].float(), atol=1e-3) for k in y)

    # one prompt: the closed-form merge that `limner merge` writes, not the last concept's weights
    base = load_base(str(tiny_base), device="cpu")
    assert apply_concepts(base, [a, b]).condition("a <new1> dog", 2).before_window is None
    merged = read_weights(merge(load_base(str(tiny_base), device="cpu"), [a, b], tmp_path / "m") / WEIGHTS_FILE)
    assert same(installed(base), merged) and not same(installed(base), weights[b])
    assert {"<new1>", "<new2>"} <= set(base.pipe.tokenizer.get_vocab())
    # regional prompts: each window is denoised with the weights of the concept its prompt names
    base = load_base(str(tiny_base), device="cpu")
    original = installed(base)
    use_window = (
        apply_concepts(base, [a, b], ["a <new2> box", "a <NEW1> dog", "a tree"]).condition("", 2).before_window
    )
    for i, want in enumerate((weights[b], weights[a], original)):
        use_window(i)
        assert same(installed(base), want), f"window {i}"
    # after a regional generation the pipeline is as it was
    use_window(1)
    generate(
        base,
        GenerationSettings("a <new2> box BREAK a <new1> dog", num_images=1, steps=2, regions=True),
        before_window=use_window,
    )
    assert same(installed(base), original)
    with pytest.warns(UserWarning, match="acts in none of them"):
        apply_concepts(load_base(str(tiny_base), device="cpu"), [a, b], ["a <new1> dog", "a tree"])


def test_custom_diffusion_and_lora_concepts_together(tiny_base, tmp_path):
    from limner.conditioning import apply_concepts
    from limner.methods.custom_diffusion import WEIGHTS_FILE, layer_weights, read_weights

    a, b = two_custom_diffusion_concepts(tiny_base, tmp_path)
    lora = get_method("dreambooth_lora").personalize(
        load_base(str(tiny_base), device="cpu"),
        subject(),
        tmp_path / "lora",
        train=db_train(),
        prior_preservation="none",
    )
    for regions in (None, ["a <new1> ball", "a sks ball", "a <new2> box"]):
        base = load_base(str(tiny_base), device="cpu")
        hook = apply_concepts(base, [lora, a, b], regions).condition("a <new1> ball", 2).before_window
        state = layer_weights(base.pipe.unet, "crossattn")
        assert not any("base_layer" in k or "lora" in k for k in state), (
            "the LoRA's wrappers are not Custom Diffusion weights"
        )
        if regions:
            hook(0)
            own = read_weights(a / WEIGHTS_FILE)
            assert all(
                torch.allclose(layer_weights(base.pipe.unet, "crossattn")[k], v.float(), atol=1e-3)
                for k, v in own.items()
            )
            hook(None)


def test_with_regions_each_lora_acts_only_in_the_windows_that_name_it(tiny_base, tmp_path):
    from limner.conditioning import apply_concepts

    def lora(name, identifier, noun):
        train = TrainConfig(max_steps=3, batch_size=2, learning_rate=5e-2, checkpoint_every=0)
        return lora_concept(tiny_base, tmp_path / name, name, identifier, noun, train)

    a, b = lora("blob", "sks", "ball"), lora("cube", "zwx", "box")
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)

    def unet_output(base) -> torch.Tensor:
        with torch.no_grad():
            return base.pipe.unet(x, t, encoder_hidden_states=text).sample

    def alone(folders) -> torch.Tensor:
        base = load_base(str(tiny_base), device="cpu")
        apply_concepts(base, folders)
        return unet_output(base)

    plain, only_a, only_b = alone([]), alone([a]), alone([b])
    assert (only_a - plain).abs().max() > 1e-4 and (only_b - plain).abs().max() > 1e-4
    # without regions both act everywhere, not only the last one applied
    both = alone([a, b])
    assert (both - only_a).abs().max() > 1e-4 and (both - only_b).abs().max() > 1e-4
    base = load_base(str(tiny_base), device="cpu")
    use_window = (
        apply_concepts(base, [a, b], ["a zwx box", "a sks ball, at night", "a tree"]).condition("", 2).before_window
    )
    for i, want in enumerate((only_b, only_a, plain)):
        use_window(i)
        assert torch.allclose(unet_output(base), want, atol=1e-5), f"window {i}"


def test_generate_composes_concepts_per_region_from_the_command_line(tiny_base, tmp_path):
    from typer.testing import CliRunner

    from limner.cli import app

    def lora(name, identifier, noun):
        return lora_concept(tiny_base, tmp_path / name, name, identifier, noun, db_train())

    a, b = lora("blob", "sks", "ball"), lora("cube", "zwx", "box")
    runner = CliRunner()

    def generate(prompt, *concepts, out="o", regions=True):
        args = ["generate", prompt, "-n", "1", "--steps", "2", "--base", str(tiny_base), "--out", str(tmp_path / out)]
        return runner.invoke(
            app, args + ["--regions"] * regions + [a for c in concepts for a in ("--concept", str(c))]
        )

    r = generate("a sks ball BREAK a zwx box", a, b)
    assert r.exit_code == 0, r.output
    record = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert [region["prompt"] for region in record["regions"]] == ["a sks ball", "a zwx box"]
    assert [region["concepts"] for region in record["regions"]] == [[str(a)], [str(b)]]
    r = generate("a sks ball BREAK a box", a, b, out="o2")
    assert r.exit_code == 0 and "note: no region's prompt names zwx" in r.output
    full = get_method("dreambooth").personalize(
        load_base(str(tiny_base), device="cpu"),
        subject(),
        tmp_path / "full",
        train=db_train(),
        prior_preservation="none",
    )
    r = generate("a sks ball", full, full, out="o3", regions=False)
    assert r.exit_code == 2 and "replaces the whole UNet" in r.output


def test_a_users_own_lora_keeps_acting_at_its_weight_beside_lora_concepts_and_their_regions(tiny_base, tmp_path):
    """A LoRA the user loaded into the pipeline (at weight 0.5) is neither reset to 1 nor switched off by a LoRA
    concept installed beside it, in any region's window, nor when the concept is taken away."""
    from limner.conditioning import apply_concepts
    from limner.methods.dreambooth import LORA_FILE

    train = TrainConfig(max_steps=3, batch_size=2, learning_rate=5e-2, checkpoint_every=0)
    mine, concept = (
        lora_concept(tiny_base, tmp_path / n, n, w, o, train)
        for n, w, o in [("blob", "sks", "ball"), ("cube", "zwx", "box")]
    )
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)

    def with_mine(*also: tuple[Path, str]):
        base = load_base(str(tiny_base), device="cpu")
        for folder, name in [(mine, "mine"), *also]:
            base.pipe.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name=name)
        base.pipe.set_adapters(["mine", *(n for _, n in also)], [0.5, *(1.0 for _ in also)])
        return base

    def unet_output(base) -> torch.Tensor:
        with torch.no_grad():
            return base.pipe.unet(x, t, encoder_hidden_states=text).sample

    mine_alone, mine_and_concept = unet_output(with_mine()), unet_output(with_mine((concept, "other")))
    assert (mine_and_concept - mine_alone).abs().max() > 1e-4
    base = with_mine()
    with apply_concepts(base, [concept]):
        assert torch.allclose(unet_output(base), mine_and_concept, atol=1e-5), "the user's weight kept"
    assert torch.allclose(unet_output(base), mine_alone, atol=1e-5), "the user's LoRA as it was"
    with apply_concepts(base, [concept], ["a zwx box", "a tree"]) as applied:
        use_window = applied.condition("", 2).before_window
        for i, want in enumerate((mine_and_concept, mine_alone)):
            use_window(i)
            assert torch.allclose(unet_output(base), want, atol=1e-5), f"window {i}"
        use_window(None)
        assert torch.allclose(unet_output(base), mine_and_concept, atol=1e-5)
