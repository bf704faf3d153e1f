"""The shared trainer and Textual Inversion, on a tiny random pipeline (training is the point here,
quality is not: that is measured on the world bench)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from limner.errors import LimnerError
from limner.methods import Subject, get_method
from limner.models.loading import load_base
from limner.training import TrainConfig


def subject(n=3):
    rng = np.random.default_rng(0)
    return Subject("blob", "ball", [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(n)])


def image_folder(folder, n=2):
    """A user's folder of reference images: the subject's images saved as PNG files."""
    from PIL import Image

    folder.mkdir()
    for i, im in enumerate(subject(n).images):
        Image.fromarray(im).save(folder / f"{i}.png")
    return folder


def ti_config(steps, **kw):
    return {"train": TrainConfig(max_steps=steps, batch_size=2, learning_rate=5e-2, weight_decay=0.0, checkpoint_every=2, **kw)}


def test_textual_inversion_trains_only_the_new_token_and_loads_in_plain_diffusers(tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = load_base(str(tiny_base), device="cpu")
    before = base.pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    out = get_method("textual_inversion").personalize(base, subject(), tmp_path / "c", **ti_config(4))
    after = base.pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[: len(before)], before), "every other row is restored"
    vec = load_file(str(out / "learned_embeds.safetensors"))["<s*>"]
    assert vec.shape == (4, 32) and (load_file(str(out / "embedding.safetensors"))["emb_params"] == vec).all()
    init = before[base.pipe.tokenizer("ball", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(vec[0].float(), init, atol=1e-3), "the embedding moved"
    assert (out / "train_log.csv").read_text().count("\n") == 5 and (out / "README.md").exists()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with_token = pipe("a <s*> on the beach", num_inference_steps=2, generator=g(), output_type="np").images
    plain = pipe("a ball on the beach", num_inference_steps=2, generator=g(), output_type="np").images
    assert not np.allclose(with_token, plain)


def test_generate_lays_a_textual_inversion_prompt_out_from_the_class_noun_first(tiny_base, tmp_path):
    import json

    from typer.testing import CliRunner

    from limner.cli import app

    concept = get_method("textual_inversion").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "c", **ti_config(1))

    def settings(*extra):
        out = tmp_path / f"out{len(extra)}"
        r = CliRunner().invoke(app, ["generate", "a <s*> with a hat on the beach", "-n", "1", "--steps", "10", "--base", str(tiny_base),
                                     "--concept", str(concept), "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        return json.loads((out / "00001.json").read_text())["settings"]

    default = settings()  # Textual Inversion's default: the first fifth of the steps from the class prompt
    assert (default["layout_prompt"], default["layout_steps"]) == ("a ball with a hat on the beach", 2)
    assert settings("--layout-steps", "0")["layout_steps"] == 0
    assert settings("--layout-steps", "4", "--seed", "1")["layout_steps"] == 4


def test_one_process_trains_in_full_then_mixed_precision(tiny_base, tmp_path):
    """accelerate refuses a second Accelerator with another precision in the same process: a notebook
    that trains twice, or an eval comparing precisions, must still work, and bf16 must still learn."""
    method = get_method("textual_inversion")
    outs = [method.personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / f"{i}-{p}", **ti_config(2, mixed_precision=p))
            for i, p in enumerate(("no", "bf16", "no"))]
    vectors = [load_file(str(o / "learned_embeds.safetensors"))["<s*>"] for o in outs]
    assert torch.equal(vectors[0], vectors[2]), "the full-precision run after a bf16 one is the run it was before"
    assert not torch.equal(vectors[0], vectors[1]), "bf16 autocast took effect"


def test_mixed_precision_holds_frozen_weights_in_half_and_gives_them_back(tmp_path):
    """What does not train is held in bf16 while training (half the memory of a frozen UNet), what trains
    stays fp32, and validation and everything after training see the frozen weights exactly as they were."""
    from torch import nn

    from limner.training import TrainingTask, train

    class Probe(TrainingTask):
        def __init__(self):
            torch.manual_seed(0)
            self.frozen, self.head = nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 1)
            self.frozen.weight.data = self.frozen.weight.data.bfloat16().float()  # stored in bf16: exact both ways
            self.seen = []

        def modules(self):
            return {"model": nn.Sequential(self.frozen, self.head)}

        def trainable_parameters(self):
            return list(self.head.parameters())

        def loss(self, batch, generator):
            self.seen.append((self.frozen.weight.dtype, self.head.weight.dtype))
            assert self.frozen.bias.dtype == torch.float32
            return self.head(self.frozen(batch["x"])).pow(2).mean()

        def trainable_state(self):
            return dict(self.head.state_dict())

        def load_trainable_state(self, state):
            self.head.load_state_dict(state)

    task, validated = Probe(), []
    before = task.frozen.weight.detach().clone()
    cfg = TrainConfig(max_steps=2, mixed_precision="bf16", checkpoint_every=0, validate_every=1)
    train(task, lambda g: {"x": torch.randn(2, 4, generator=g)}, cfg, tmp_path, validate=lambda step: validated.append(task.frozen.weight.dtype))
    assert task.seen == [(torch.bfloat16, torch.float32)] * 2
    assert validated == [torch.float32] * 2, "validation draws with the weights the pipeline had"
    assert task.frozen.weight.dtype == torch.float32 and torch.equal(task.frozen.weight, before), "given back exactly"
    # the bias is not exact in bf16: on a CPU it would need a copy beside the half weights, so it stays fp32
    assert task.frozen.bias.dtype == torch.float32


def test_norm_cap_holds_learned_vectors_to_a_multiple_of_the_words_norm(tiny_base, tmp_path):
    """Left free, the vectors outgrow every word of the vocabulary; norm_cap=1 keeps each at most as long
    as the vocabulary's mean word."""

    def learned_norms(folder, **settings):
        base = load_base(str(tiny_base), device="cpu")
        words = base.pipe.text_encoder.get_input_embeddings().weight.detach().norm(dim=-1).mean()
        out = get_method("textual_inversion").personalize(base, subject(), tmp_path / folder, **ti_config(4), **settings)
        return load_file(str(out / "learned_embeds.safetensors"))["<s*>"].float().norm(dim=-1) / words

    assert learned_norms("free").max() > 1.2
    assert learned_norms("capped", norm_cap=1).max() < 1.01  # fp16 on disk
    with pytest.raises(LimnerError, match="norm_cap"):
        learned_norms("bad", norm_cap=0)


def test_masked_loss_weighs_the_subject_and_not_its_backgrounds(tiny_base, tmp_path):
    """background_weight=w with the subject's masks: each latent pixel's loss weighs 1 on the subject and
    w off it (mirrored with a mirrored image); w=1 is the paper's whole-image loss, w=0 trains otherwise."""
    from limner.training.data import subject_loss_weights

    images = subject().images
    masks = [np.zeros(im.shape[:2], bool) for im in images]
    for m in masks:
        m[:, :28] = True  # the subject: the left 28 of 48 columns, 24 of the 40 that the centre crop keeps
    blob = Subject("blob", "ball", images, masks=masks)

    w = subject_loss_weights(blob, 32, 4, True, 0.25)  # centre crop 40 x 40 -> 32 x 32 -> a 4 x 4 latent
    assert w.shape == (6, 1, 4, 4)
    assert torch.allclose(w[0, 0, :, :2], torch.ones(4, 2), atol=0.01) and torch.allclose(w[0, 0, :, 3], torch.full((4,), 0.25), atol=0.01)
    assert 0.25 < float(w[0, 0, 0, 2]) < 1, "a latent pixel on the subject's edge weighs in between"
    assert torch.equal(w[3], w[0].flip(-1)), "a mirrored image gets the mirrored mask"
    with pytest.raises(LimnerError, match="one mask per reference image"):
        subject_loss_weights(Subject("blob", "ball", images, masks=masks[:2]), 32, 4, False, 0.0)

    def vectors(name, **settings):
        out = get_method("textual_inversion").personalize(load_base(str(tiny_base), device="cpu"), blob, tmp_path / name,
                                                          **ti_config(3), **settings)
        return load_file(str(out / "learned_embeds.safetensors"))["<s*>"].float()

    whole = vectors("whole")
    assert torch.allclose(vectors("w1", background_weight=1.0), whole, atol=1e-3)
    assert not torch.allclose(vectors("w0", background_weight=0.0), whole, atol=1e-3), "the masks reached the loss"
    with pytest.raises(LimnerError, match="background_weight"):
        vectors("bad", background_weight=2.0)
    with pytest.raises(LimnerError, match="masks/NAME.png"):
        get_method("textual_inversion").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "no-masks",
                                                    **ti_config(1), background_weight=0.5)


def test_reference_images_are_mirrored_only_when_asked(tiny_base, tmp_path):
    """A subject is often not symmetric (a logo, text): flipping is an opt-in setting (flip=true),
    which adds each reference image's mirror image to the training data."""

    from limner.training.data import encode_images, fit_square

    base = load_base(str(tiny_base), device="cpu")
    vae, res, images = base.pipe.vae, base.resolution, subject().images
    plain, both = encode_images(vae, images, res), encode_images(vae, images, res, flip=True)
    assert len(plain.mean) == 3 and both.source.tolist() == [0, 1, 2, 0, 1, 2]
    mirrored = encode_images(vae, [fit_square(im, res)[:, ::-1].copy() for im in images], res)
    assert torch.allclose(both.mean[3:], mirrored.mean, atol=1e-5)

    ti = get_method("textual_inversion")
    a = ti.personalize(base, subject(), tmp_path / "a", **ti_config(2))
    b = ti.personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "b", **ti_config(2, flip=True))
    vectors = [load_file(str(c / "learned_embeds.safetensors"))["<s*>"] for c in (a, b)]
    assert not torch.equal(*vectors), "flip=true trains on other images"


def test_resume_latest_gives_the_same_result_as_an_uninterrupted_run(tiny_base, tmp_path):

    straight = get_method("textual_inversion").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "a", **ti_config(6))
    # interrupted after 4 steps (checkpoint at 4), then resumed to 6
    get_method("textual_inversion").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "b", **ti_config(4))
    resumed = get_method("textual_inversion").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "b",
                                                          **ti_config(6, resume="latest"))
    a = load_file(str(straight / "learned_embeds.safetensors"))["<s*>"]
    b = load_file(str(resumed / "learned_embeds.safetensors"))["<s*>"]
    assert torch.equal(a, b)


def test_resume_with_other_settings_is_refused(tiny_base, tmp_path):
    get_method("textual_inversion").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "c", **ti_config(2))
    cfg = ti_config(4, resume="latest")
    cfg["train"].learning_rate = 1e-3
    with pytest.raises(LimnerError, match="learning_rate"):
        get_method("textual_inversion").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "c", **cfg)


def test_placeholder_already_in_vocabulary(tiny_base, tmp_path):
    with pytest.raises(LimnerError, match="already in the tokenizer"):
        get_method("textual_inversion").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "c",
                                                    token="ball", **ti_config(1))


def test_cli_train_then_generate_with_the_concept(tiny_base, tmp_path):
    from typer.testing import CliRunner

    from limner.cli import app

    folder = image_folder(tmp_path / "subj")
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--method", "textual_inversion", "--subject", str(folder), "--class-noun", "ball", "--steps", "2",
                            "--batch-size", "1", "--token", "<blob>", "--base", str(tiny_base), "--out", str(tmp_path / "concept")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", "a <blob> in the snow", "-n", "1", "--steps", "1", "--base", str(tiny_base),
                            "--concept", str(tmp_path / "concept"), "--out", str(tmp_path / "img")])
    assert r.exit_code == 0, r.output
    # another base: refused unless --force
    from conftest import build_tiny_pipeline

    other = tmp_path / "other-base"
    build_tiny_pipeline(other)
    from safetensors.torch import load_file, save_file

    unet_file = other / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(unet_file))
    state = {k: v + 0.01 for k, v in state.items()}
    save_file(state, str(unet_file))
    args = ["generate", "a <blob>", "-n", "1", "--steps", "1", "--base", str(other), "--concept", str(tmp_path / "concept"), "--out", str(tmp_path / "o2")]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "trained on base" in r.output
    assert runner.invoke(app, args + ["--force"]).exit_code == 0


def db_train(steps=2, **kw):
    return TrainConfig(max_steps=steps, batch_size=2, learning_rate=1e-3, checkpoint_every=0, **kw)


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


def test_closed_form_merge_meets_its_constraint_and_stays_close_elsewhere():
    from limner.methods.custom_diffusion import closed_form

    g = torch.Generator().manual_seed(0)
    W0, C_reg, C = torch.randn(8, 16, generator=g), torch.randn(200, 16, generator=g), torch.randn(3, 16, generator=g)
    V = torch.randn(8, 3, generator=g)
    W = closed_form(W0, C_reg, C, V, constraint_weight=1e6, ridge=0.0)
    assert torch.allclose(W @ C.t(), V, atol=1e-3), "a heavy weight recovers the paper's equality constraint"
    # another solution of the same constraint (the minimum-norm update) disturbs the regularisation features more
    other = W0 + (V - W0 @ C.t()) @ torch.linalg.pinv(C.t())
    assert torch.allclose(other @ C.t(), V, atol=1e-3)
    assert ((W - W0) @ C_reg.t()).norm() < ((other - W0) @ C_reg.t()).norm()
    # the default weight trades a little of the constraint for the regularisation features
    soft = closed_form(W0, C_reg, C, V)
    assert (soft @ C.t() - V).norm() < 0.1 * (W0 @ C.t() - V).norm()
    assert ((soft - W0) @ C_reg.t()).norm() < ((W - W0) @ C_reg.t()).norm()


def test_closed_form_merge_is_defined_when_constraints_outnumber_dimensions():
    from limner.methods.custom_diffusion import closed_form

    g = torch.Generator().manual_seed(1)
    W0, C_reg, C = torch.randn(8, 16, generator=g), torch.randn(200, 16, generator=g), torch.randn(40, 16, generator=g)
    W_target = torch.randn(8, 16, generator=g)
    W = closed_form(W0, C_reg, C, W_target @ C.t())  # 40 consistent constraints in 16 dimensions
    assert torch.isfinite(W).all()
    assert (W @ C.t() - W_target @ C.t()).norm() < 0.2 * (W0 @ C.t() - W_target @ C.t()).norm()


def test_custom_diffusion_trains_kv_and_token_and_round_trips(tiny_base, tmp_path):
    from limner.methods.custom_diffusion import read_weights

    base = load_base(str(tiny_base), device="cpu")
    k_before = {n: m.to_k.weight.detach().clone() for n, m in base.pipe.unet.named_modules() if n.endswith("attn2")}
    q_before = {n: m.to_q.weight.detach().clone() for n, m in base.pipe.unet.named_modules() if n.endswith("attn2")}
    out = get_method("custom_diffusion").personalize(base, subject(), tmp_path / "c", prior_preservation=False, augment_variants=3,
                                                   mode="crossattn_kv",
                                                   train=TrainConfig(max_steps=3, batch_size=2, learning_rate=1e-2, checkpoint_every=0))
    state = load_file(str(out / "pytorch_custom_diffusion_weights.safetensors"))
    assert len(state) == 2 * len(k_before) and all(".attn2.processor.to_" in k for k in state)
    for n, m in base.pipe.unet.named_modules():
        if n.endswith("attn2"):
            assert not torch.equal(m.to_k.weight, k_before[n]) and torch.equal(m.to_q.weight, q_before[n])
    assert load_file(str(out / "<new1>.safetensors"))["<new1>"].shape == (1, 32)
    # the loader applies it to a fresh base, and reads the same weights from diffusers' .bin layout (opt-in)
    fresh = load_base(str(tiny_base), device="cpu")
    get_method("custom_diffusion").install(fresh, [out])
    for n, m in fresh.pipe.unet.named_modules():
        if n.endswith("attn2"):
            assert torch.allclose(m.to_k.weight, state[f"{n}.processor.to_k_custom_diffusion.weight"].float())
    torch.save({**state, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.x": torch.zeros(1)}, tmp_path / "cd.bin")
    with pytest.raises(LimnerError, match="allow-pickle"):
        read_weights(tmp_path / "cd.bin")
    assert set(read_weights(tmp_path / "cd.bin", allow_pickle=True)) == set(state)


def test_custom_diffusion_default_trains_all_of_attn2_in_diffusers_layout(tiny_base, tmp_path):
    base = load_base(str(tiny_base), device="cpu")
    out = get_method("custom_diffusion").personalize(base, subject(), tmp_path / "c", prior_preservation=False, augment_variants=1,
                                                   train=TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2, checkpoint_every=0))
    state = load_file(str(out / "pytorch_custom_diffusion_weights.safetensors"))
    layers = [n for n, _ in base.pipe.unet.named_modules() if n.endswith("attn2")]
    for name in layers:  # the keys diffusers' CustomDiffusionAttnProcessor has with train_q_out=True
        for key in ("to_q_custom_diffusion.weight", "to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight",
                    "to_out_custom_diffusion.0.weight", "to_out_custom_diffusion.0.bias"):
            assert f"{name}.processor.{key}" in state
    fresh = load_base(str(tiny_base), device="cpu")
    get_method("custom_diffusion").install(fresh, [out])
    for name in layers:
        attn = fresh.pipe.unet.get_submodule(name)
        assert torch.allclose(attn.to_q.weight, state[f"{name}.processor.to_q_custom_diffusion.weight"].float())
        assert torch.allclose(attn.to_out[0].weight, state[f"{name}.processor.to_out_custom_diffusion.0.weight"].float())


def test_merge_constrains_only_what_follows_the_modifier_token(tiny_base):
    from limner.methods.custom_diffusion import prompt_features
    from limner.methods.textual_inversion import add_tokens_everywhere
    from limner.training.conditioning import PromptEncoder

    base = load_base(str(tiny_base), device="cpu")
    encoder = PromptEncoder(base.pipe, base.resolution)
    add_tokens_everywhere(encoder, ["<new1>"], "box")
    C = prompt_features(encoder, ["<new1> box", "a photo of a <new1> box"], from_token="<new1>")
    length = encoder.encode(encoder.tokenize(["a"]))[0].shape[1]
    assert C.shape[0] == (length - 1) + (length - 5), "every row from <new1> on, padding included"
    # the rows every prompt shares (begin token, "a photo of a") are C_reg's, never a concept's target
    shared = prompt_features(encoder, ["a photo of a"])
    assert not any(torch.allclose(row, s, atol=1e-4) for row in C for s in shared)


def two_custom_diffusion_concepts(tiny_base, tmp_path) -> tuple:
    cfg = dict(prior_preservation=False, augment=False, train=TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2, checkpoint_every=0))
    a = get_method("custom_diffusion").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "a", **cfg)
    b = get_method("custom_diffusion").personalize(load_base(str(tiny_base), device="cpu"), Subject("cube", "box", subject().images),
                                                   tmp_path / "b", modifier_token="<new2>", **cfg)
    return a, b


def test_custom_diffusion_merge_of_two_concepts(tiny_base, tmp_path):
    from limner.methods.custom_diffusion import merge

    a, b = two_custom_diffusion_concepts(tiny_base, tmp_path)
    merged = merge(load_base(str(tiny_base), device="cpu"), [a, b], tmp_path / "m")
    fresh = load_base(str(tiny_base), device="cpu")
    get_method("custom_diffusion").install(fresh, [merged])
    assert {"<new1>", "<new2>"} <= set(fresh.pipe.tokenizer.get_vocab())
    with pytest.raises(LimnerError, match="share a modifier token"):
        merge(load_base(str(tiny_base), device="cpu"), [a, a], tmp_path / "m2")
    kv = get_method("custom_diffusion").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "kv",
                                                    modifier_token="<new3>", mode="crossattn_kv", prior_preservation=False, augment=False,
                                                    train=TrainConfig(max_steps=1, batch_size=2, checkpoint_every=0))
    with pytest.raises(LimnerError, match=r"different modes.*\(crossattn\).*\(crossattn_kv\)"):
        merge(load_base(str(tiny_base), device="cpu"), [a, kv], tmp_path / "m3")


def test_merge_keeps_each_concept_on_every_row_of_its_prompts(tiny_base, tmp_path):
    """The merged K/V give what each concept's own K/V gave on the prompts it was trained on, on every
    row the UNet attends to (padding included), and the merged manifest keeps those prompts."""
    from limner.methods import custom_diffusion as cd
    from limner.training.conditioning import PromptEncoder

    a, b = two_custom_diffusion_concepts(tiny_base, tmp_path)
    merged = cd.read_weights(cd.merge(load_base(str(tiny_base), device="cpu"), [a, b], tmp_path / "m") / cd.WEIGHTS_FILE)
    base = load_base(str(tiny_base), device="cpu")
    W0 = cd.layer_weights(base.pipe.unet, "crossattn")
    manifests = cd.read_concepts(base, [a, b])
    cd.load_tokens(base, [a, b], manifests)
    encoder = PromptEncoder(base.pipe, base.resolution)
    for concept, manifest in zip((a, b), manifests):
        prompts, token_id = manifest["training_prompts"], base.pipe.tokenizer.convert_tokens_to_ids(manifest["tokens"][0])
        feats = encoder.encode(encoder.tokenize(prompts))[0].float()
        ids = base.pipe.tokenizer(prompts, padding="max_length", max_length=feats.shape[1], return_tensors="pt").input_ids
        X = torch.cat([f[int((i == token_id).nonzero()[0]):] for f, i in zip(feats, ids)])  # from the token to the last pad
        tuned = cd.read_weights(concept / cd.WEIGHTS_FILE)
        for key in (k for k in tuned if "to_k_custom" in k or "to_v_custom" in k):
            want = tuned[key].float() @ X.t()
            assert (merged[key].float() @ X.t() - want).norm() < 0.25 * (W0[key] @ X.t() - want).norm(), key
    written = json.loads((tmp_path / "m" / "limner.json").read_text())["training_prompts"]
    assert {p for m in manifests for p in m["training_prompts"]} == set(written)


def test_merge_keeps_the_meaning_of_the_captions_it_is_given(tiny_base, tmp_path):
    """`limner merge --captions FILE`: the merge keeps W0's outputs on those captions (the paper's C_reg)."""
    from typer.testing import CliRunner

    from limner.cli import app
    from limner.methods.custom_diffusion import read_weights

    a, b = two_custom_diffusion_concepts(tiny_base, tmp_path)
    (tmp_path / "caps.txt").write_text("a red car in the city\n\na dog on the grass\n")
    (tmp_path / "empty.txt").write_text("\n")
    merge = lambda out, *extra: CliRunner().invoke(app, ["merge", str(a), str(b), "--out", str(tmp_path / out),  # noqa: E731
                                                         "--base", str(tiny_base), "--device", "cpu", *extra])
    assert merge("generic").exit_code == 0 and merge("given", "--captions", str(tmp_path / "caps.txt")).exit_code == 0
    weights = [read_weights(tmp_path / out / "pytorch_custom_diffusion_weights.safetensors") for out in ("generic", "given")]
    assert any(not torch.allclose(weights[0][k].float(), weights[1][k].float()) for k in weights[0])
    r = merge("bad", "--captions", str(tmp_path / "empty.txt"))
    assert r.exit_code != 0 and "empty.txt has no captions" in r.output and not (tmp_path / "bad").exists()


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
    use_window = apply_concepts(base, [a, b], ["a <new2> box", "a <NEW1> dog", "a tree"]).condition("", 2).before_window
    for i, want in enumerate((weights[b], weights[a], original)):
        use_window(i)
        assert same(installed(base), want), f"window {i}"
    # after a regional generation the pipeline is as it was
    use_window(1)
    generate(base, GenerationSettings("a <new2> box BREAK a <new1> dog", num_images=1, steps=2, regions=True),
             before_window=use_window)
    assert same(installed(base), original)
    with pytest.warns(UserWarning, match="acts in none of them"):
        apply_concepts(load_base(str(tiny_base), device="cpu"), [a, b], ["a <new1> dog", "a tree"])


def test_custom_diffusion_and_lora_concepts_together(tiny_base, tmp_path):
    from limner.conditioning import apply_concepts
    from limner.methods.custom_diffusion import WEIGHTS_FILE, layer_weights, read_weights

    a, b = two_custom_diffusion_concepts(tiny_base, tmp_path)
    lora = get_method("dreambooth_lora").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "lora",
                                                    train=db_train(), prior_preservation="none")
    for regions in (None, ["a <new1> ball", "a sks ball", "a <new2> box"]):
        base = load_base(str(tiny_base), device="cpu")
        hook = apply_concepts(base, [lora, a, b], regions).condition("a <new1> ball", 2).before_window
        state = layer_weights(base.pipe.unet, "crossattn")
        assert not any("base_layer" in k or "lora" in k for k in state), "the LoRA's wrappers are not Custom Diffusion weights"
        if regions:
            hook(0)
            own = read_weights(a / WEIGHTS_FILE)
            assert all(torch.allclose(layer_weights(base.pipe.unet, "crossattn")[k], v.float(), atol=1e-3) for k, v in own.items())
            hook(None)


def test_with_regions_each_lora_acts_only_in_the_windows_that_name_it(tiny_base, tmp_path):
    from limner.conditioning import apply_concepts

    def lora(name, identifier, noun):
        return get_method("dreambooth_lora").personalize(load_base(str(tiny_base), device="cpu"), Subject(name, noun, subject().images),
                                                        tmp_path / name, identifier=identifier, prior_preservation="none",
                                                        train=TrainConfig(max_steps=3, batch_size=2, learning_rate=5e-2, checkpoint_every=0))

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
    use_window = apply_concepts(base, [a, b], ["a zwx box", "a sks ball, at night", "a tree"]).condition("", 2).before_window
    for i, want in enumerate((only_b, only_a, plain)):
        use_window(i)
        assert torch.allclose(unet_output(base), want, atol=1e-5), f"window {i}"


def test_generate_composes_concepts_per_region_from_the_command_line(tiny_base, tmp_path):
    from typer.testing import CliRunner

    from limner.cli import app

    def lora(name, identifier, noun):
        return get_method("dreambooth_lora").personalize(load_base(str(tiny_base), device="cpu"), Subject(name, noun, subject().images),
                                                        tmp_path / name, identifier=identifier, prior_preservation="none", train=db_train())

    a, b = lora("blob", "sks", "ball"), lora("cube", "zwx", "box")
    runner = CliRunner()

    def generate(prompt, *concepts, out="o", regions=True):
        args = ["generate", prompt, "-n", "1", "--steps", "2", "--base", str(tiny_base), "--out", str(tmp_path / out)]
        return runner.invoke(app, args + ["--regions"] * regions + [a for c in concepts for a in ("--concept", str(c))])

    r = generate("a sks ball BREAK a zwx box", a, b)
    assert r.exit_code == 0, r.output
    record = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert [region["prompt"] for region in record["regions"]] == ["a sks ball", "a zwx box"]
    assert [region["concepts"] for region in record["regions"]] == [[str(a)], [str(b)]]
    r = generate("a sks ball BREAK a box", a, b, out="o2")
    assert r.exit_code == 0 and "note: no region's prompt names zwx" in r.output
    full = get_method("dreambooth").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "full", train=db_train(),
                                               prior_preservation="none")
    r = generate("a sks ball", full, full, out="o3", regions=False)
    assert r.exit_code == 2 and "replaces the whole UNet" in r.output


def test_embedding_formats_load_into_a_base(tiny_base, tmp_path):
    from safetensors.torch import save_file

    from limner.methods.textual_inversion import load_embedding

    vec = torch.randn(2, 32)
    save_file({"<a>": vec}, str(tmp_path / "diffusers.safetensors"))
    save_file({"emb_params": vec}, str(tmp_path / "kohya.safetensors"))
    torch.save({"string_to_param": {"*": vec}, "name": "<c>", "string_to_token": {"*": 265}, "step": 100}, tmp_path / "a1111.pt")
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 64)}, str(tmp_path / "sdxl.safetensors"))
    base = load_base(str(tiny_base), device="cpu")
    assert load_embedding(base, tmp_path / "diffusers.safetensors") == "<a>"
    assert load_embedding(base, tmp_path / "kohya.safetensors", token="<b>") == "<b>"
    with pytest.raises(LimnerError, match="allow-pickle"):
        load_embedding(base, tmp_path / "a1111.pt")
    assert load_embedding(base, tmp_path / "a1111.pt", allow_pickle=True) == "<c>"
    with pytest.raises(LimnerError, match="SDXL"):
        load_embedding(base, tmp_path / "sdxl.safetensors", token="<d>")
    save_file({"<e>": torch.randn(1, 768)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(LimnerError, match="width 768"):
        load_embedding(base, tmp_path / "wide.safetensors")
    ids = base.pipe.tokenizer("<a> <b> <c>", add_special_tokens=False).input_ids
    emb = base.pipe.text_encoder.get_input_embeddings().weight
    assert torch.allclose(emb[ids[0]], vec[0], atol=1e-6)


def test_two_cpu_processes_under_accelerate_launch(tiny_base, tmp_path):
    import os
    import subprocess
    import sys


    folder = image_folder(tmp_path / "subj")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--module", "limner.cli", "train", "--method", "textual_inversion",
           "--subject", str(folder), "--class-noun", "ball", "--steps", "3", "--batch-size", "1", "--base", str(tiny_base),
           "--out", str(tmp_path / "c"), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "c" / "limner.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["steps"] == 3
    assert proc.stdout.count("concept written") == 1, "one process writes the artifact"


def test_validation_images_and_a_full_disk(tiny_base, tmp_path, monkeypatch):
    import errno

    import limner.methods.textual_inversion as ti

    base = load_base(str(tiny_base), device="cpu")
    cfg = ti_config(4)
    cfg["train"].validate_every = 2
    out = get_method("textual_inversion").personalize(base, subject(), tmp_path / "c", **cfg)
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]
    before = (out / "learned_embeds.safetensors").read_bytes()

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ti, "save_file", full_disk)
    with pytest.raises(LimnerError, match="disk is full"):
        get_method("textual_inversion").personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "c",
                                                    **ti_config(6, resume="latest"))
    assert (out / "learned_embeds.safetensors").read_bytes() == before, "the earlier artifact is intact"


def test_changing_a_default_changes_the_eval_cache_key(monkeypatch):
    import limner.methods.dreambooth as db

    from limner.evaluation.cache_keys import default_settings

    before = default_settings(get_method("dreambooth"))
    monkeypatch.setattr(db, "default_train_config", lambda lora: TrainConfig(max_steps=7))
    assert default_settings(get_method("dreambooth")) != before
    assert default_settings(get_method("textual_inversion"))["train"]["learning_rate"] > 0


def test_a_new_setting_that_is_off_by_default_keeps_the_concepts_trained_before_it(monkeypatch):
    from limner.evaluation import cache_keys
    from limner.evaluation.cache_keys import concept_key

    ti = get_method("textual_inversion")
    before, plain = concept_key(ti, {}, "subject", "base"), cache_keys.default_settings
    monkeypatch.setattr(cache_keys, "default_settings", lambda method: plain(method) | {"new_setting": None})
    assert concept_key(ti, {}, "subject", "base") == before
    assert concept_key(ti, {"new_setting": 2}, "subject", "base") != before
    assert concept_key(ti, {"num_vectors": 8}, "subject", "base") != before != concept_key(ti, {}, "other subject", "base")


def test_a_subjects_masks_enter_its_fingerprint_only_where_training_reads_them():
    from limner.evaluation.subjects import EvalSubject

    images = [np.zeros((8, 8, 3), np.uint8)]
    a = EvalSubject("s", "ball", images, masks=[np.zeros((8, 8), bool)])
    b = EvalSubject("s", "ball", images, masks=[np.ones((8, 8), bool)])
    assert a.fingerprint() == b.fingerprint(), "a concept trained without masks keeps its cache key"
    assert a.fingerprint(masks=True) != b.fingerprint(masks=True), "a masked loss retrains when the masks change"


def test_only_the_masked_loss_reads_a_subjects_masks():
    assert get_method("textual_inversion").reads_masks({"background_weight": 0.1})
    assert not get_method("textual_inversion").reads_masks({"num_vectors": 2})
    assert not get_method("dreambooth").reads_masks({})


def test_a_new_setting_declared_as_added_keeps_the_concepts_trained_before_it(monkeypatch):
    from dataclasses import dataclass, fields

    from limner.evaluation.cache_keys import concept_key, default_settings
    from limner.methods import added_setting

    ti = get_method("textual_inversion")
    plain_config = ti.default_config
    before = concept_key(ti, {}, "subject", "base")

    def with_config(cls):
        def default_config(self):
            cfg = plain_config()
            return cls(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})

        monkeypatch.setattr(type(ti), "default_config", default_config)

    @dataclass
    class WithAdded(type(plain_config())):
        gentle: bool = added_setting(False)

    @dataclass
    class WithPlain(type(plain_config())):
        gentle: bool = False  # declared plainly, its default enters every key

    with_config(WithAdded)
    assert default_settings(ti)["gentle"] is False
    assert concept_key(ti, {}, "subject", "base") == concept_key(ti, {"gentle": False}, "subject", "base") == before
    assert concept_key(ti, {"gentle": True}, "subject", "base") != before
    with_config(WithPlain)
    assert concept_key(ti, {}, "subject", "base") != before


def test_settings_given_that_equal_a_default_are_the_same_run():
    from limner.evaluation.cache_keys import default_settings, settings_with

    lora, ti = get_method("dreambooth_lora"), get_method("textual_inversion")
    assert settings_with(lora, {"lora_rank": 16, "learning_rate": 2e-3}) == default_settings(lora)
    assert settings_with(lora, {"max_steps": 800})["train"]["max_steps"] == 800
    assert settings_with(lora, {"lora_rank": 8}) != default_settings(lora)
    assert settings_with(lora, {"min_snr_gamma": 5})["train"]["min_snr_gamma"] == 5.0
    assert isinstance(settings_with(lora, {"min_snr_gamma": 5})["train"]["min_snr_gamma"], float)
    assert settings_with(ti, {"learning_rate": 5e-3, "num_vectors": 4}) == default_settings(ti)


def test_custom_diffusion_joint_training_of_two_concepts(tiny_base, tmp_path):
    from limner.methods.custom_diffusion import CustomDiffusion

    cfg = dict(prior_preservation=False, augment=False, train=TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2, checkpoint_every=0))
    out = CustomDiffusion().personalize(load_base(str(tiny_base), device="cpu"), [subject(), Subject("cube", "box", subject().images)],
                                                tmp_path / "joint", **cfg)
    manifest = json.loads((out / "limner.json").read_text())
    assert manifest["subject"] == ["blob", "cube"] and manifest["tokens"] == ["<new1>", "<new2>"]
    fresh = load_base(str(tiny_base), device="cpu")
    CustomDiffusion().install(fresh, [out])
    assert {"<new1>", "<new2>"} <= set(fresh.pipe.tokenizer.get_vocab())


def test_cli_trains_a_concepts_list_jointly_with_custom_diffusion_only(tiny_base, tmp_path):
    """A JSON list of subjects (the paper's concepts list): Custom Diffusion trains them together, with
    as many default steps per concept as for one; a method without joint training says so."""
    from typer.testing import CliRunner

    from limner.cli import app
    from limner.methods.custom_diffusion import default_train_config

    entries = [{"name": name, "path": str(image_folder(tmp_path / name)), "class_noun": noun} for name, noun in (("blob", "ball"), ("cube", "box"))]
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps(entries))
    assert default_train_config(2).max_steps == 2 * default_train_config().max_steps
    args = ["train", "--subject", str(concepts), "--steps", "1", "--batch-size", "1", "--base", str(tiny_base)]
    r = CliRunner().invoke(app, [*args, "--method", "custom_diffusion", "--set", "prior_preservation=false", "--out", str(tmp_path / "joint")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "joint" / "limner.json").read_text())
    assert manifest["subject"] == ["blob", "cube"] and manifest["class_nouns"] == ["ball", "box"] and manifest["steps"] == 1
    r = CliRunner().invoke(app, [*args, "--method", "dreambooth_lora", "--out", str(tmp_path / "db")])
    assert r.exit_code != 0 and "trains one at a time" in r.output and not (tmp_path / "db").exists()
    r = CliRunner().invoke(app, [*args, "--method", "custom_diffusion", "--token", "<cat>", "--out", str(tmp_path / "tok")])
    assert r.exit_code == 2 and "<new1> to <new2>" in r.output and not (tmp_path / "tok").exists()


def test_captions_reach_the_training_prompts_and_can_be_turned_off(tiny_base, tmp_path):
    base = load_base(str(tiny_base), device="cpu")
    s = subject()
    s.captions = ["on the beach", "in the snow", ""]
    db = get_method("dreambooth_lora")
    out = db.personalize(base, s, tmp_path / "c", train=db_train(), prior_preservation="none")
    prompts = json.loads((out / "limner.json").read_text())["training_prompts"]
    assert prompts == ["a sks ball on the beach", "a sks ball in the snow", "a sks ball"]
    off = db.personalize(load_base(str(tiny_base), device="cpu"), s, tmp_path / "d", train=db_train(), prior_preservation="none", captions=False)
    assert json.loads((off / "limner.json").read_text())["training_prompts"] == ["a sks ball"] * 3
    s.captions = ["on the beach"]
    with pytest.raises(LimnerError, match="1 captions for 3 images"):
        get_method("textual_inversion").personalize(base, s, tmp_path / "e", **ti_config(1))


def test_caption_files_beside_images_and_unknown_settings(tmp_path):
    from PIL import Image

    from limner.evaluation.subjects import folder_subject

    for i in range(2):
        Image.new("RGB", (32, 32), (i * 100, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("  on a red\nsofa ")
    s = folder_subject(tmp_path, class_noun="dog")
    assert s.captions == ["on a red sofa", ""]
    with pytest.raises(LimnerError, match="has no setting 'rnak'"):
        get_method("dreambooth_lora").personalize(None, s, tmp_path / "c", rnak=4)


def test_cli_train_settings_and_token_reach_the_method(tiny_base, tmp_path):
    from typer.testing import CliRunner

    from limner.cli import app

    folder = image_folder(tmp_path / "subj")
    args = ["train", "--method", "dreambooth_lora", "--subject", str(folder), "--class-noun", "ball", "--steps", "1", "--batch-size", "1",
            "--base", str(tiny_base), "--out", str(tmp_path / "c")]
    r = CliRunner().invoke(app, args + ["--token", "zwx", "--set", "prior_preservation=none", "--set", "lora_rank=2", "--set", "checkpoint_every=0",
                                        "--set", "seed=3"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "c" / "limner.json").read_text())
    assert m["identifier"] == "zwx" and m["config"]["lora_rank"] == 2 and m["config"]["train"]["checkpoint_every"] == 0
    assert m["config"]["train"]["seed"] == 3, "a trainer setting given with --set is not reset by an option left out"
    r = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "c2"), "--set", "seed=3", "--seed", "5", "--set", "prior_preservation=none"])
    assert r.exit_code == 0 and json.loads((tmp_path / "c2" / "limner.json").read_text())["config"]["train"]["seed"] == 5, "the explicit option wins"
    r = CliRunner().invoke(app, args + ["--set", "prior_preservation"])
    assert r.exit_code == 2 and "key=value" in r.output


def test_bad_subject_folders_get_specific_errors_and_leave_earlier_concepts_alone(tiny_base, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from limner.cli import app

    def train(folder, out, *extra):
        return CliRunner().invoke(app, ["train", "--method", "textual_inversion", "--subject", str(folder), "--steps", "1",
                                        "--batch-size", "1", "--base", str(tiny_base), "--out", str(out), *extra])

    empty = tmp_path / "empty"
    empty.mkdir()
    r = train(empty, tmp_path / "c", "--class-noun", "ball")
    assert r.exit_code == 2 and "has no images" in r.output and str(empty) in r.output
    # one image, a grayscale 16-bit one, a stray non-image file: trains (one image is enough to start)
    single = tmp_path / "single"
    single.mkdir()
    Image.fromarray(np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30).save(single / "a.png")
    (single / "notes.md").write_text("not an image")
    good = tmp_path / "good"
    r = train(single, good, "--class-noun", "teddy bear")  # a class noun of two words: its tokens' mean initialises <s*>
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}
    # a corrupt file: an error naming it, and the concept already in --out is untouched
    (single / "b.png").write_bytes(b"\x89PNG not really")
    r = train(single, good, "--class-noun", "ball")
    assert r.exit_code == 2 and "b.png" in r.output and "not a readable image" in r.output
    assert before == {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}


def test_custom_diffusion_retrieval_builds_its_index_once_and_rebuilds_it_when_the_pool_changes(tmp_path, monkeypatch):
    from PIL import Image

    from limner.methods.custom_diffusion import folder_pool, retrieve

    class MeanColourCLIP:
        """Embeds an image as its mean colour and "a red ..." as red: retrieval by colour, counted."""

        embedded = 0

        def images(self, images):
            self.embedded += len(images)
            return torch.nn.functional.normalize(torch.tensor(np.stack([np.asarray(i, float).mean((0, 1)) for i in images])).float(), dim=-1)

        def texts(self, texts):
            return torch.tensor([[1.0, 0.0, 0.0]])

    monkeypatch.setenv("LIMNER_CACHE", str(tmp_path / "cache"))
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    colours = {"red": (220, 10, 10), "green": (10, 220, 10), "blue": (10, 10, 220), "pink": (230, 120, 120)}
    for name, rgb in colours.items():
        Image.new("RGB", (16, 16), rgb).save(pool_dir / f"{name}.png")
        (pool_dir / f"{name}.txt").write_text(f"a {name} thing")
    (pool_dir / "uncaptioned.png").write_bytes((pool_dir / "red.png").read_bytes())
    clip = MeanColourCLIP()

    first = retrieve(folder_pool(pool_dir), "a red thing", 2, clip, "clip-a")
    assert [c for _, c in first] == ["a red thing", "a pink thing"] and clip.embedded == 4, "uncaptioned images are not in the pool"
    again = retrieve(folder_pool(pool_dir), "a red thing", 2, clip, "clip-a")
    assert [c for _, c in again] == ["a red thing", "a pink thing"] and clip.embedded == 4, "the cached index is reused"
    retrieve(folder_pool(pool_dir), "a red thing", 2, clip, "clip-b")
    assert clip.embedded == 8, "another CLIP model gets its own index"
    Image.new("RGB", (16, 16), (10, 10, 10)).save(pool_dir / "pink.png")  # a changed file
    changed = retrieve(folder_pool(pool_dir), "a red thing", 2, clip, "clip-a")
    assert clip.embedded == 12 and [c for _, c in changed][0] == "a red thing"
    assert not list((tmp_path / "cache" / "retrieval").glob("*.tmp"))


def test_the_command_line_process_keeps_exit_codes_and_output(tmp_path):
    """The CLI skips the interpreter's teardown after a command: codes and output must survive it."""
    import subprocess
    import sys

    def limner(*args):
        return subprocess.run([sys.executable, "-m", "limner.cli", *args], capture_output=True, text=True, timeout=120)

    ok = limner("train", "--help")
    assert ok.returncode == 0 and "--subject" in ok.stdout
    bad = limner("train", "--method", "textual_inversion", "--subject", str(tmp_path / "missing"), "--out", str(tmp_path / "c"))
    assert bad.returncode == 2 and "missing" in bad.stderr and not (tmp_path / "c" / "limner.json").exists()


def test_merge_keeps_the_meaning_of_world_captions_or_generic_prompts():
    from types import SimpleNamespace

    from limner.methods.custom_diffusion import merge_captions

    world = merge_captions(SimpleNamespace(is_world=True), 6)
    assert len(world) == 6 and all(isinstance(c, str) and c.startswith("a") for c in world) and len(set(world)) > 1
    assert merge_captions(SimpleNamespace(is_world=True), 6) == world, "the same captions every time"
    generic = merge_captions(SimpleNamespace(is_world=False), 200)
    assert len(set(generic)) == 200 and generic == merge_captions(SimpleNamespace(is_world=False), 200)
    assert len({c.split(" of a ")[-1].split(" ")[0] for c in generic}) > 20, "many nouns, not a handful"
