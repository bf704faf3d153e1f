"""BLIP-Diffusion (limner.methods.blip_diffusion) on a tiny random pipeline: the subject embeddings enter the prompt
where the official code puts them, the export loads in diffusers' own component classes with every key, the two
pretraining stages lower each of their losses, the few-shot fine-tune moves the concept, and a concept draws through
limner.conditioning; bad input gets specific errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import tiny_image_encoder

from limner.concepts import read_manifest
from limner.conditioning import apply_concepts
from limner.errors import LimnerError
from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.methods.blip_diffusion import formats
from limner.methods.blip_diffusion.context_text import (
    CTX_BEGIN_POS,
    build_prompt,
    encode_with_context,
    insert_context,
    tokenize_with_context,
)
from limner.methods.blip_diffusion.method import EMBEDS, ImagePrep, Stage1, Stage2, official_prompt
from limner.methods.blip_diffusion.qformer import Stage1Heads, build_bert_tokenizer, world_words
from limner.models.loading import load_base
from limner.training import TrainConfig, train

SMALL = {"qformer_layers": 1, "qformer_intermediate": 64}
QUICK = {"stage1_steps": 2, "max_steps": 2, "batch_size": 2, "checkpoint_every": 0, **SMALL}


@pytest.fixture(scope="module")
def blip_base(tmp_path_factory):
    """The tiny SD pipeline with a CLIP vision tower as its image_encoder component (the world base has one)."""
    from conftest import build_tiny_pipeline

    folder = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-blip"))
    tiny_image_encoder(folder / "image_encoder")
    return folder


@pytest.fixture(scope="module")
def base(blip_base):
    return load_base(str(blip_base), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    from helpers import ToyStream

    return get_method("blip_diffusion").pretrain(
        base, _MaskedStream(ToyStream(n=6)), tmp_path_factory.mktemp("a"), **QUICK
    )


class _MaskedStream:
    """ToyStream's samples with a subject mask (a centred square) and a world-like subject key."""

    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        while True:
            for s in self.stream:
                mask = np.zeros(s.image.shape[:2], bool)
                mask[6:18, 6:18] = True
                s.mask, s.subject = mask, f"object:ball:{s.subject}"
                yield s

    def describe(self):
        return {"kind": "toy"}


def _subject(n=3, seed=0, name="toy"):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 255, (24, 24, 3), dtype=np.uint8) for _ in range(n)]
    masks = [np.pad(np.ones((12, 12), bool), 6) for _ in range(n)]
    return Subject(name, "ball", images, masks)


# ---- prompt and injection, as the official code ---------------------------------------------------------------


def test_prompt_is_the_official_one():
    # LAVIS / diffusers `_build_prompt`: "a {tgt_subject} {prompt}" repeated int(strength * reps) times
    assert build_prompt(" swimming underwater ", "dog") == ", ".join(["a dog swimming underwater"] * 20)
    assert build_prompt("on grass", "cat", prompt_strength=0.5, prompt_reps=4) == "a cat on grass, a cat on grass"
    # a bench prompt ("a {} on the beach" with the class noun) is the official text prompt after "a {subject}"
    assert official_prompt("a ball on the beach", "ball", reps=2) == "a ball on the beach, a ball on the beach"
    assert official_prompt("on the beach", "ball", reps=1) == "a ball on the beach"


def test_injection_position_matches_diffusers_context_clip(base):
    """The subject embeddings sit at ctx_begin_pos = 2, the text budget is max_length - 16, and limner's spliced
    embeddings are diffusers' ContextCLIPTextEmbeddings' to the bit."""
    from diffusers.pipelines.deprecated.blip_diffusion import ContextCLIPTextModel

    te, tok = base.pipe.text_encoder, base.pipe.tokenizer
    ids = tokenize_with_context(tok, [build_prompt("on the beach", "ball")], 16)
    assert ids.shape == (1, tok.model_max_length - 16)
    assert ids[0, 0] == tok.bos_token_id and tok.decode(ids[0, 1:2]).strip() == "a"
    ctx = torch.randn(1, 16, te.config.hidden_size)
    official = ContextCLIPTextModel(te.config)
    official.load_state_dict(formats.context_text_state(te))
    with torch.no_grad():
        theirs = official.text_model.embeddings(input_ids=ids, ctx_embeddings=ctx, ctx_begin_pos=[CTX_BEGIN_POS])
        spliced = insert_context(te.embeddings.token_embedding(ids), ctx)
        mine = spliced + te.embeddings.position_embedding(torch.arange(spliced.shape[1]))[None]
        assert torch.equal(mine, theirs)
        assert torch.equal(spliced[0, 2:18], ctx[0])  # right after BOS and "a"
        # no subject: exactly the CLIP text model (its causal mask included)
        plain = tok(["a ball"], padding="max_length", return_tensors="pt").input_ids
        assert torch.allclose(encode_with_context(te, plain, None), te(plain).last_hidden_state, atol=1e-6)
        # the subject reaches only the text after it (CLIP's causal mask): BOS and "a" do not move
        a = encode_with_context(te, ids, ctx)
        b = encode_with_context(te, ids, ctx + 1)
        assert torch.equal(a[:, :2], b[:, :2]) and not torch.allclose(a[:, 2:], b[:, 2:])


# ---- the export, in diffusers' component classes -------------------------------------------------------------


def test_export_loads_in_diffusers_classes_and_reads_back(base, adapter, tmp_path):
    from diffusers.pipelines.deprecated.blip_diffusion import ContextCLIPTextModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel

    method = get_method("blip_diffusion")
    out = method.export(base, adapter, tmp_path / "pipe")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "BlipDiffusionPipeline" and index["ctx_begin_pos"] == 2
    qformer, info = Blip2QFormerModel.from_pretrained(out / "qformer", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    text, info = ContextCLIPTextModel.from_pretrained(out / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # limner's modules compute what diffusers' do, where diffusers' still run on transformers 5
    encoder, prep = method.load_encoder(base, adapter)
    pixels = prep([im for im in _subject().images])
    qformer.eval()
    with torch.no_grad():
        assert torch.allclose(
            qformer.visual_encoder(pixels).last_hidden_state, encoder.visual_encoder(pixels), atol=1e-5
        )
        multimodal = encoder.multimodal(pixels, ["ball"] * 3)
        assert torch.allclose(qformer.proj_layer(multimodal), encoder.proj_layer(multimodal), atol=1e-6)
    # read back as an adapter: the same subject embeddings as from limner's own folder
    subject = _subject()
    mine = read_manifest(method.personalize(base, subject, tmp_path / "c1", adapter=adapter))
    theirs = read_manifest(method.personalize(base, subject, tmp_path / "c2", adapter=out))
    del mine, theirs
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "c1" / EMBEDS))["ctx_embeddings"]
    b = load_file(str(tmp_path / "c2" / EMBEDS))["ctx_embeddings"]
    assert torch.allclose(a, b, atol=1e-2)  # the adapter's fp16 Q-Former, exported as it is


def test_exported_folder_as_the_base_draws_what_the_adapter_draws(base, adapter, tmp_path):
    """`--base DIR` of an exported folder: its UNet (the LoRA merged), VAE and CLIP as the base, its Q-Former as
    the adapter; a concept encoded there draws what the limner adapter's concept draws on the original base."""
    method = get_method("blip_diffusion")
    out = method.export(base, adapter, tmp_path / "pipe")
    exported = load_base(str(out), device="cpu", dtype="fp32")
    subject = _subject()
    there = method.personalize(exported, subject, tmp_path / "there")  # no adapter named: the folder's own
    here = method.personalize(base, subject, tmp_path / "here", adapter=adapter)
    assert read_manifest(there)["adapter"] == str(out.resolve())
    reference = _draw(base, here)
    assert np.abs(_draw(exported, there) - reference).mean() < 1.0
    # `--adapter DIR` on the original base: the folder's UNet and text encoder swapped in, and back out after
    before = {k: v.clone() for k, v in base.pipe.unet.state_dict().items()}
    swapped = method.personalize(base, subject, tmp_path / "swapped", adapter=out)
    assert np.abs(_draw(base, swapped) - reference).mean() < 1.0
    assert all(torch.equal(v, base.pipe.unet.state_dict()[k]) for k, v in before.items())


def test_folder_without_qformer_is_a_clear_error(base, adapter, tmp_path):
    out = get_method("blip_diffusion").export(base, adapter, tmp_path / "pipe")
    shutil.rmtree(out / "qformer")
    with pytest.raises(LimnerError, match="qformer/"):
        get_method("blip_diffusion").personalize(base, _subject(), tmp_path / "c", adapter=out)


# ---- pretraining ----------------------------------------------------------------------------------------------


def test_short_pretrain_lowers_each_loss_term(base, tmp_path):
    """A few steps on one fixed batch: ITC and ITG (stage 1) and the denoising loss (stage 2) each go down."""
    from limner.adapters.lora import add_lora, remove_named_lora
    from limner.methods.blip_diffusion.method import BlipDiffusionSettings, stage2_batches
    from limner.methods.blip_diffusion.qformer import blip2_config  # noqa: F401 - the sizes below are its

    torch.manual_seed(0)
    encoder = formats.new_subject_encoder(
        base.path / "image_encoder",
        build_bert_tokenizer(world_words()),
        num_hidden_layers=1,
        intermediate_size=64,
        hidden_size=32,
    )
    prep = ImagePrep.for_encoder(encoder, None)
    subject = _subject(n=4)
    texts = ["a red ball on the beach", "a blue cup in the snow", "a green dog in a forest", "a cat"]
    batch1 = {"pixels": prep(subject.images), "texts": texts}
    task1 = Stage1(encoder, Stage1Heads(32))
    with torch.no_grad():
        before = {k: float(v) for k, v in task1.loss_terms(batch1).items()}
    train(
        task1,
        lambda g: batch1,
        TrainConfig(max_steps=15, batch_size=4, learning_rate=1e-3, checkpoint_every=0),
        tmp_path / "s1",
    )
    with torch.no_grad():
        after = {k: float(v) for k, v in task1.loss_terms(batch1).items()}
    assert after["itc"] < before["itc"] and after["itg"] < before["itg"], (before, after)

    stream = _MaskedStream(_Fixed(_samples(subject, texts)))
    batch2 = stage2_batches(stream, prep, base.resolution, 4)(torch.Generator().manual_seed(0))
    unet = base.pipe.unet
    add_lora(unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    try:
        task2 = Stage2(base, encoder, BlipDiffusionSettings(drop_subject=0.0))

        def denoise() -> float:
            task2.wrapped = {"unet": unet, "qformer": encoder}
            with torch.no_grad():
                return float(task2.loss(batch2, torch.Generator().manual_seed(1)))

        first = denoise()
        train(
            task2,
            lambda g: batch2,
            TrainConfig(max_steps=15, batch_size=4, learning_rate=1e-3, checkpoint_every=0),
            tmp_path / "s2",
        )
        assert denoise() < first
    finally:
        remove_named_lora(unet, "default")


class _Fixed:
    def __init__(self, samples):
        self.samples = samples

    def __iter__(self):
        return iter(self.samples)


def test_checkpoints_hold_the_trained_encoder_weights_not_the_frozen_image_encoder(base):
    """A checkpoint's subject encoder state leaves out the frozen image encoder (the base's) and loads back into a
    fresh encoder; a checkpoint that still holds it loads too; one missing a trained weight is a clear error."""
    from limner.methods.blip_diffusion.method import encoder_state, load_encoder_state

    def small_encoder(seed: int):
        torch.manual_seed(seed)
        return formats.new_subject_encoder(
            base.path / "image_encoder", build_bert_tokenizer(world_words()), num_hidden_layers=1, hidden_size=32
        )

    trained, fresh = small_encoder(0), small_encoder(1)
    state = encoder_state(trained)
    assert state and not any(k.startswith("qformer.visual_encoder.") for k in state)
    load_encoder_state(fresh, state)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.state_dict().items())
    old = {f"qformer.{k}": v for k, v in trained.state_dict().items()}  # as checkpoints before held it
    load_encoder_state(small_encoder(2), old)
    lacking = dict(state)
    lacking.pop(next(k for k in state if "query_tokens" in k or "layer" in k))
    with pytest.raises(LimnerError, match="missing"):
        load_encoder_state(small_encoder(3), lacking)


def _samples(subject, texts):
    from types import SimpleNamespace

    return [
        SimpleNamespace(image=im, text=t, references=[im], mask=None, subject=None)
        for im, t in zip(subject.images, texts)
    ]


def test_adapter_folder_is_small_and_recorded(adapter):
    manifest = json.loads((adapter / "adapter.json").read_text())
    assert manifest["method"] == "blip_diffusion" and manifest["steps"] == {"stage1": 2, "stage2": 2}
    for name in (formats.QFORMER_WEIGHTS, formats.QFORMER_CONFIG, formats.LORA_FILE):
        assert (adapter / name).is_file()
    from safetensors.torch import load_file

    weights = load_file(str(adapter / formats.QFORMER_WEIGHTS))
    assert all(v.dtype == torch.float16 for v in weights.values())
    assert not any(k.startswith("visual_encoder.") for k in weights)  # the base's own, by fingerprint


def test_init_continues_stage_2_from_an_adapter_and_records_it(base, adapter, tmp_path):
    """init=ADAPTER: stage 1 is skipped and stage 2 starts from its Q-Former and UNet LoRA (at learning rate 0 they
    come out unchanged); the new adapter.json names it; a LoRA of another rank is refused, naming lora_rank."""
    from helpers import ToyStream
    from safetensors.torch import load_file

    from limner.methods.adapter import adapter_fingerprint

    method, data = get_method("blip_diffusion"), _MaskedStream(ToyStream(n=6))
    settings = {**QUICK, "max_steps": 1, "learning_rate": 0.0}
    continued = method.pretrain(base, data, tmp_path / "continued", init=str(adapter), **settings)
    for name in (formats.QFORMER_WEIGHTS, formats.LORA_FILE):
        start, end = (load_file(str(a / name)) for a in (adapter, continued))
        assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start), name
    lora = load_file(str(adapter / formats.LORA_FILE))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k), "a trained start"
    manifest = json.loads((continued / "adapter.json").read_text())
    assert manifest["steps"] == {"stage2": 1}
    assert manifest["started_from"]["fingerprint"] == adapter_fingerprint(adapter)
    assert manifest["started_from"]["steps"] == {"stage1": 2, "stage2": 2}
    with pytest.raises(LimnerError, match="lora_rank"):
        method.pretrain(base, data, tmp_path / "other-rank", init=str(adapter), lora_rank=4, **QUICK)


# ---- use: zero-shot, fine-tuned, generation --------------------------------------------------------------------


def test_zero_shot_and_fine_tuned_concepts(base, adapter, tmp_path):
    """Zero-shot averages the references' embeddings; the fine-tune trains them (and the UNet's LoRA) on the
    subject, so its concept fits the subject's pictures better, and draws differently."""
    from safetensors.torch import load_file

    method = get_method("blip_diffusion")
    subject = _subject()
    zero = method.personalize(base, subject, tmp_path / "zero", adapter=adapter)
    tuned = method.personalize(
        base, subject, tmp_path / "tuned", adapter=adapter, finetune_steps=12, finetune_learning_rate=1e-2
    )
    assert read_manifest(zero)["unet_lora"] is None and read_manifest(tuned)["unet_lora"] == formats.LORA_FILE
    a, b = (load_file(str(c / EMBEDS))["ctx_embeddings"] for c in (zero, tuned))
    assert a.shape == (1, 16, 32) and not torch.allclose(a, b)
    assert _fit(base, zero, subject) > _fit(base, tuned, subject)
    images = [_draw(base, c) for c in (zero, tuned)]
    assert np.abs(images[0] - images[1]).mean() > 0.5


def _fit(base, concept, subject) -> float:
    """The denoising loss of the subject's pictures under the concept's conditioning (fixed noise and steps)."""
    from limner.images import to_unit_range
    from limner.training import noise_scheduler
    from limner.training.data import fit_square
    from limner.training.losses import denoising_loss

    method = get_method("blip_diffusion")
    with apply_concepts(base, [concept]):
        cond = method.condition(base, [concept], f"a {subject.class_noun}")["prompt_embeds"]
        vae = base.pipe.vae
        x = to_unit_range(np.stack([fit_square(im, base.resolution) for im in subject.images]))
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            losses = [
                float(
                    denoising_loss(base.pipe.unet, noise_scheduler(base.pipe), latents, cond.expand(len(x), -1, -1), g)
                )
                for _ in range(8)
            ]
    return float(np.mean(losses))


def _draw(base, concept) -> np.ndarray:
    method = get_method("blip_diffusion")
    with apply_concepts(base, [concept]) as applied:
        s = GenerationSettings(prompt=method.prompt("a {} on the beach", concept), steps=3, num_images=1, seed=0)
        result = generate(base, s, conditioning=applied.condition(s.prompt, s.steps))
    return np.asarray(result.images[0]).astype(float)


def test_concept_draws_through_conditioning_and_uninstalls(base, adapter, tmp_path):
    method = get_method("blip_diffusion")
    concept = method.personalize(base, _subject(), tmp_path / "c", adapter=adapter)
    before = {k: v.clone() for k, v in base.pipe.unet.state_dict().items()}
    with apply_concepts(base, [concept]) as applied:
        conditioning = applied.condition("a ball on the beach", 3)
        embeds = conditioning.pipe_kwargs["prompt_embeds"]
        assert embeds.shape == (1, base.pipe.tokenizer.model_max_length, 32)
        s = GenerationSettings(prompt="a ball on the beach", steps=3, num_images=1, seed=0)
        drawn = np.asarray(generate(base, s, conditioning=conditioning).images[0]).astype(float)
    plain = np.asarray(generate(base, s).images[0]).astype(float)
    assert np.abs(drawn - plain).mean() > 0.5  # the subject embeddings and the LoRA act
    after = base.pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_layout_steps_draw_from_the_words_first(base, adapter, tmp_path):
    """limner's default draws the first fifth of the steps from the prompt's words alone, then the subject
    embeddings; the paper's generation (layout_fraction=0) has them in every step; `--layout-steps` sets the
    count for a BLIP concept, whose prompt names it in no word."""
    method = get_method("blip_diffusion")
    ours = method.personalize(base, _subject(), tmp_path / "ours", adapter=adapter)
    paper = method.personalize(base, _subject(), tmp_path / "paper", adapter=adapter, layout_fraction=0.0)
    prompt = "a ball on the beach"
    with apply_concepts(base, [ours]) as applied:
        conditioning = applied.condition(prompt, 10)
        assert (conditioning.layout_prompt, conditioning.layout_steps) == (prompt, 2)
        assert applied.condition(prompt, 10, layout_steps=0).layout_steps == 0
        s = GenerationSettings(prompt=prompt, steps=4, num_images=1, seed=0)
        laid_out = np.asarray(generate(base, s, conditioning=applied.condition(prompt, 4, 3)).images[0])
        direct = np.asarray(generate(base, s, conditioning=applied.condition(prompt, 4, 0)).images[0])
    assert np.abs(laid_out.astype(float) - direct).mean() > 0.5
    with apply_concepts(base, [paper]) as applied:
        assert applied.condition(prompt, 10).layout_steps == 0
    with pytest.raises(LimnerError, match="layout_fraction"):
        method.personalize(base, _subject(), tmp_path / "bad", adapter=adapter, layout_fraction=1.0)


# ---- bad input -------------------------------------------------------------------------------------------------


def test_reference_without_subject_is_a_clear_error(base, adapter, tmp_path):
    method = get_method("blip_diffusion")
    subject = _subject()
    subject.masks[1] = np.zeros_like(subject.masks[1])
    with pytest.raises(LimnerError, match="reference 1 shows no subject"):
        method.personalize(base, subject, tmp_path / "c", adapter=adapter)
    blank = Subject("blank", "ball", [np.full((24, 24, 3), 128, np.uint8)])
    with pytest.raises(LimnerError, match="one flat colour"):
        method.personalize(base, blank, tmp_path / "d", adapter=adapter)


def test_bad_settings_are_named(base, adapter, tmp_path):
    method = get_method("blip_diffusion")
    with pytest.raises(LimnerError, match="finetune_steps"):
        method.personalize(base, _subject(), tmp_path / "c", adapter=adapter, finetune_steps=-1)
    with pytest.raises(LimnerError, match="drop_subject"):
        method.personalize(base, _subject(), tmp_path / "c", adapter=adapter, drop_subject=2)


def test_shipped_world_adapter_is_small_and_encodes():
    """The world's adapter ships inside the package (under 10 MB of fp16 safetensors) and encodes a bench
    subject with the world base."""
    method = get_method("blip_diffusion")
    folder = method.shipped_adapter({})
    if folder is None:
        pytest.skip("this install has no shipped BLIP-Diffusion world adapter")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 10e6
    manifest = json.loads((folder / "adapter.json").read_text())
    assert manifest["method"] == "blip_diffusion"
    from helpers import lineage

    steps = [record["steps"] for record in lineage(manifest)]
    assert steps == [{"stage2": 4000}] * 3 + [{"stage1": 1000, "stage2": 1800}]
    world = load_base(None)
    encoder, prep = method.load_encoder(world, folder)
    from limner.world.bench import SUBJECTS, subject_references

    refs = subject_references(SUBJECTS[0])
    ctx = method.subject_embeddings(encoder, prep, [r.image for r in refs], SUBJECTS[0].cls)
    assert ctx.shape == (1, 16, world.pipe.text_encoder.config.hidden_size) and torch.isfinite(ctx).all()


def test_export_command(blip_base, adapter, tmp_path):
    from typer.testing import CliRunner

    from limner.cli import app

    out = tmp_path / "pipe"
    args = ["export", "--method", "blip_diffusion", "--adapter", str(adapter), "--base", str(blip_base), "--out"]
    r = CliRunner().invoke(app, [*args, str(out)])
    assert r.exit_code == 0, r.output
    assert formats.is_pipeline_folder(out) and (out / "qformer" / "model.safetensors").is_file()
    r = CliRunner().invoke(app, [*args, str(out)])
    assert r.exit_code == 2 and "not empty" in r.output
    r = CliRunner().invoke(app, ["export", "--method", "ip_adapter", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "blip_diffusion" in r.output


def test_the_papers_fine_tune_is_one_switch_away():
    """`--set recipe=paper`: the paper's 40 steps at lr 5e-6, batch 3, in place of limner's learning rate; a
    setting given beside it wins, and an unknown recipe is an error naming the ones there are."""
    from limner.methods.blip_diffusion.method import BlipDiffusionSettings
    from limner.methods.settings import with_recipe, with_settings

    method = get_method("blip_diffusion")
    paper = with_settings(BlipDiffusionSettings(), with_recipe(method, {"recipe": "paper"}), method.name)
    assert (paper.finetune_steps, paper.finetune_learning_rate, paper.finetune_batch_size) == (40, 5e-6, 3)
    assert paper.layout_fraction == 0.0  # the subject embeddings in every step
    assert with_settings(BlipDiffusionSettings(), {}, method.name).finetune_learning_rate != 5e-6
    assert with_recipe(method, {"recipe": "paper", "finetune_steps": 10})["finetune_steps"] == 10
    with pytest.raises(LimnerError, match="limner, paper"):
        with_recipe(method, {"recipe": "dreambench"})
