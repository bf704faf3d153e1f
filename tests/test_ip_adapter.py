"""IP-Adapter (limner.methods.ip_adapter) on tiny random pipelines: what it writes is the official layout, plain
diffusers loads it and draws the same images, the paper's loss trains, per-block scales act where named, SDXL runs
the same path, and bad input gets specific errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import ToyStream, tiny_image_encoder
from safetensors.torch import load_file, save_file

from limner.adapters import ip_processors
from limner.concepts import read_manifest
from limner.conditioning import apply_concepts
from limner.errors import LimnerError
from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.methods.ip_adapter import (
    EMBEDS,
    WEIGHTS,
    ImageEncoder,
    IPAdapter,
    _batches,
    _Pretraining,
    detach,
    read_adapter_weights,
)
from limner.models.loading import load_base
from limner.training import TrainConfig, train

PLUS = {"resampler_dim": 64}  # heads of 64: one head at the tiny size
QUICK = {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def ip_base(tmp_path_factory):
    """The tiny SD pipeline with a CLIP vision tower as its image_encoder component, as the world base has."""
    from conftest import build_tiny_pipeline
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    folder = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-ip"))
    encoder = tiny_image_encoder(tmp_path_factory.mktemp("encoder") / "image_encoder")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def adapters(ip_base, tmp_path_factory):
    """One briefly pretrained adapter per variant."""
    method, out = get_method("ip_adapter"), tmp_path_factory.mktemp("adapters")
    return {
        variant: method.pretrain(
            load_base(str(ip_base), device="cpu"),
            ToyStream(),
            out / variant,
            variant=variant,
            **(PLUS if variant == "plus" else {}),
            **QUICK,
        )
        for variant in ("plain", "plus", "full")
    }


def references(n=2, size=40, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8) for _ in range(n)]


def subject(n=2):
    return Subject("blob", "ball", references(n))


def diffusers_pipe(folder, cls=None):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = (cls or StableDiffusionPipeline).from_pretrained(folder)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    return pipe


SETTINGS = GenerationSettings("a ball on the beach", num_images=1, steps=3, batch_size=1, seed=3)


def limner_image(base, concept, s=SETTINGS, allow_pickle: bool = False) -> np.ndarray:
    with apply_concepts(base, [concept], allow_pickle=allow_pickle) as applied:
        return np.asarray(generate(base, s, conditioning=applied.condition(s.prompt, s.steps)).images[0])


def diffusers_image(pipe, base, s=SETTINGS, **ip) -> np.ndarray:
    image = pipe(
        [s.prompt],
        num_inference_steps=s.steps,
        guidance_scale=s.guidance_scale,
        height=base.resolution,
        width=base.resolution,
        generator=[torch.Generator().manual_seed(s.seed)],
        **ip,
    ).images[0]
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------------------------
# The official layout, and plain diffusers drawing what limner draws
# ---------------------------------------------------------------------------------------------------------------

OFFICIAL_PROJ_KEYS = {
    "plain": {"proj.weight", "proj.bias", "norm.weight", "norm.bias"},
    "full": {f"proj.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")},
}


@pytest.mark.parametrize(
    ("variant", "mode", "scale"), [("plain", "mean", 1.0), ("plus", "concat", 0.6), ("full", "mean", 1.0)]
)
def test_each_variant_is_the_official_layout_and_diffusers_draws_what_limner_draws(
    ip_base, adapters, tmp_path, variant, mode, scale
):
    adapter = adapters[variant]
    flat = load_file(str(adapter / WEIGHTS))
    ip_keys = {k for k in flat if k.startswith("ip_adapter.")}
    assert ip_keys == {f"ip_adapter.{i}.{p}.weight" for i in (1, 3, 5, 7) for p in ("to_k_ip", "to_v_ip")}
    proj_keys = {k.removeprefix("image_proj.") for k in flat if k.startswith("image_proj.")}
    assert set(flat) == ip_keys | {f"image_proj.{k}" for k in proj_keys}
    if variant in OFFICIAL_PROJ_KEYS:
        assert proj_keys == OFFICIAL_PROJ_KEYS[variant]
    else:  # the official Resampler's names: layers.N.0.{norm1, norm2, to_q, to_kv, to_out}, layers.N.1.{0, 1, 3}
        assert {"latents", "proj_in.weight", "layers.3.0.to_kv.weight", "layers.0.1.3.weight"} <= proj_keys
    assert all(v.dtype == torch.float16 for v in flat.values())
    manifest = json.loads((adapter / "adapter.json").read_text())
    assert manifest["variant"] == variant and manifest["steps"] == 2 and len(manifest["curve"]) == 2
    assert (manifest["settings"]["pair"], manifest["settings"]["captions"]) == ("self", "full"), "the paper's on data"

    base = load_base(str(ip_base), device="cpu")
    refs = references(2)
    concept = get_method("ip_adapter").personalize(
        base, Subject("blob", "ball", refs), tmp_path / "c", adapter=adapter, references=mode, scale=scale
    )
    ours = limner_image(base, concept)

    pipe = diffusers_pipe(ip_base)
    pipe.load_ip_adapter(str(adapter), subfolder="", weight_name=WEIGHTS)
    pipe.set_ip_adapter_scale(scale)
    if mode == "concat":  # diffusers' several images of one adapter: their tokens attended together
        theirs = diffusers_image(pipe, base, ip_adapter_image=[refs])
    else:  # the mean of diffusers' own embeddings, with its unconditional input
        from PIL import Image

        positive, negative = pipe.encode_image(
            [Image.fromarray(r) for r in refs], "cpu", 1, output_hidden_states=variant != "plain"
        )
        stored = load_file(str(concept / EMBEDS))
        assert torch.allclose(stored["image_embeds"], positive.mean(0, keepdim=True), atol=1e-6)
        embeds = torch.stack([negative[:1], positive.mean(0, keepdim=True)])
        theirs = diffusers_image(pipe, base, ip_adapter_image_embeds=[embeds])
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    assert diff == 0, f"max abs difference {diff} (uint8)"
    plain = np.asarray(generate(base, SETTINGS).images[0])
    assert not np.array_equal(ours, plain), "the adapter changes the picture"
    assert np.array_equal(plain, np.asarray(generate(base, SETTINGS).images[0]))


def test_a_batch_of_images_draws_each_as_alone(ip_base, adapters, tmp_path):
    """generate repeats the [negative; positive] rows for a batch: image i of a batch is image i drawn alone."""
    base = load_base(str(ip_base), device="cpu")
    concept = get_method("ip_adapter").personalize(base, subject(), tmp_path / "c", adapter=adapters["plain"])
    s = GenerationSettings("a ball", num_images=2, steps=2, batch_size=2)
    with apply_concepts(base, [concept]) as applied:
        batch = generate(base, s, conditioning=applied.condition(s.prompt, s.steps)).images
        alone = generate(base, replace(s, batch_size=1), conditioning=applied.condition(s.prompt, s.steps)).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(batch, alone))


def test_num_references_encodes_only_the_first_ones(ip_base, adapters, tmp_path):
    """The bench's "from 1 reference" row: num_references=1 encodes the first reference alone."""
    from safetensors.torch import load_file

    base, method = load_base(str(ip_base), device="cpu"), get_method("ip_adapter")
    first = method.personalize(base, subject(1), tmp_path / "first", adapter=adapters["plain"])
    one = method.personalize(base, subject(3), tmp_path / "one", adapter=adapters["plain"], num_references=1)
    every = method.personalize(base, subject(3), tmp_path / "all", adapter=adapters["plain"])
    embeds = {c.name: load_file(next(c.glob("*.safetensors"))) for c in (first, one, every)}
    assert all(torch.equal(embeds["first"][k], embeds["one"][k]) for k in embeds["first"])
    assert not all(torch.equal(embeds["all"][k], embeds["one"][k]) for k in embeds["all"])
    assert len(list((one / "references").iterdir())) == 1


def test_references_are_cut_out_where_the_adapter_learned_on_cut_outs(ip_base, adapters, tmp_path):
    """A pair=view or pair=cut adapter saw its subjects on grey: its references are encoded the same way where the
    subject has masks (mask_references=None follows the adapter), and either choice can be forced; a pair=crop
    adapter's are also cropped to the subject."""
    from PIL import Image

    from limner.images import BACKGROUND_GREY, crop_to_subject

    base, method = load_base(str(ip_base), device="cpu"), get_method("ip_adapter")
    masks = [np.zeros(im.shape[:2], bool) for im in references(2)]
    for m in masks:
        m[10:30, 12:36] = True
    masked = Subject("blob", "ball", references(2), masks)
    view = tmp_path / "view-adapter"
    shutil.copytree(adapters["plain"], view)
    manifest = json.loads((view / "adapter.json").read_text())
    manifest["settings"]["pair"] = "view"
    (view / "adapter.json").write_text(json.dumps(manifest))

    def encoded(adapter, out, **settings):
        concept = method.personalize(base, masked, tmp_path / out, adapter=adapter, **settings)
        ref = np.asarray(Image.open(concept / "references" / "00.png"))
        return ref, json.loads((concept / "limner.json").read_text())["config"]["mask_references"]

    ref, cut = encoded(view, "view")
    assert (
        cut and (ref[~masks[0]] == BACKGROUND_GREY).all() and np.array_equal(ref[masks[0]], references(2)[0][masks[0]])
    )
    cut_pair = tmp_path / "cut-adapter"  # pair=cut: its conditions were the targets cut out, so are the references
    shutil.copytree(view, cut_pair)
    manifest["settings"]["pair"] = "cut"
    (cut_pair / "adapter.json").write_text(json.dumps(manifest))
    assert np.array_equal(encoded(cut_pair, "cut")[0], ref)
    ref, cut = encoded(adapters["plain"], "self")
    assert not cut and np.array_equal(ref, references(2)[0]), "the paper's pairing: the whole picture"
    assert encoded(adapters["plain"], "forced", mask_references=True)[1]
    assert not encoded(view, "unmasked", mask_references=False)[1]
    crop = tmp_path / "crop-adapter"  # pair=crop: its conditions were cut out and cropped to the subject
    shutil.copytree(view, crop)
    manifest["settings"]["pair"] = "crop"
    (crop / "adapter.json").write_text(json.dumps(manifest))
    ref, cut = encoded(crop, "crop")
    assert cut and np.array_equal(ref, crop_to_subject(references(2)[0], masks[0]))
    assert (ref == BACKGROUND_GREY).all(-1).mean() < 0.5 * (~masks[0]).mean(), "the subject fills the frame"


def test_finetune_trains_the_concepts_own_adapter_which_diffusers_loads(ip_base, adapters, tmp_path):
    """finetune_steps: the concept carries its own fine-tuned copy of the adapter in the official layout;
    limner draws with it, and plain diffusers loads it from the concept folder and draws the same."""
    base, method = load_base(str(ip_base), device="cpu"), get_method("ip_adapter")
    encoded = method.personalize(base, subject(3), tmp_path / "encoded", adapter=adapters["plain"])
    tuned = method.personalize(base, subject(3), tmp_path / "tuned", adapter=adapters["plain"], finetune_steps=3)
    assert not (encoded / WEIGHTS).exists() and read_manifest(encoded)["adapter_weights"] is None
    start, mine = load_file(str(adapters["plain"] / WEIGHTS)), load_file(str(tuned / WEIGHTS))
    assert set(mine) == set(start) and all(v.dtype == torch.float16 for v in mine.values())
    assert any(not torch.equal(start[k], mine[k]) for k in start), "the fine-tune moved the weights"
    assert (tuned / "train_log.csv").is_file() and read_manifest(tuned)["config"]["finetune_steps"] == 3
    ours = limner_image(base, tuned)
    assert not np.array_equal(ours, limner_image(base, encoded))

    pipe = diffusers_pipe(ip_base)
    pipe.load_ip_adapter(str(tuned), subfolder="", weight_name=WEIGHTS)
    stored = load_file(str(tuned / EMBEDS))
    theirs = diffusers_image(
        pipe, base, ip_adapter_image_embeds=[torch.stack([stored["negative_image_embeds"], stored["image_embeds"]])]
    )
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() == 0
    with pytest.raises(LimnerError, match="finetune_steps"):
        method.personalize(base, subject(1), tmp_path / "bad", adapter=adapters["plain"], finetune_steps=-1)


def test_the_image_projection_runs_once_per_generation(ip_base, adapters, tmp_path):
    """The pipeline gives the UNet the same image embeds at every step: the projection (a Resampler for plus)
    runs once per generation, and again for a new one, drawing what a projection at every step draws."""
    base, method = load_base(str(ip_base), device="cpu"), get_method("ip_adapter")
    concept = method.personalize(base, subject(2), tmp_path / "c", adapter=adapters["plus"])
    calls = []
    with apply_concepts(base, [concept]) as applied:
        proj = base.pipe.unet.encoder_hid_proj.image_projection_layers[0]
        hook = proj.register_forward_hook(lambda *_: calls.append(1))
        cond = applied.condition(SETTINGS.prompt, SETTINGS.steps)
        once = np.asarray(generate(base, SETTINGS, conditioning=cond).images[0])
        assert len(calls) == 1, f"{len(calls)} projections for {SETTINGS.steps} steps"
        again = np.asarray(generate(base, SETTINGS, conditioning=applied.condition(SETTINGS.prompt, 3)).images[0])
        assert len(calls) == 2 and np.array_equal(once, again)
        hook.remove()
    pipe = diffusers_pipe(ip_base)
    pipe.load_ip_adapter(str(adapters["plus"]), subfolder="", weight_name=WEIGHTS)
    stored = load_file(str(concept / EMBEDS))
    theirs = diffusers_image(
        pipe, base, ip_adapter_image_embeds=[torch.stack([stored["negative_image_embeds"], stored["image_embeds"]])]
    )
    assert np.abs(once.astype(int) - theirs.astype(int)).max() == 0, "as diffusers, projecting at every step"


def test_official_files_read_as_safetensors_and_bin_only_with_allow_pickle(ip_base, adapters, tmp_path):
    base = load_base(str(ip_base), device="cpu")
    method = get_method("ip_adapter")
    flat = load_file(str(adapters["plus"] / WEIGHTS))
    official = tmp_path / "official" / "ip-adapter-plus_tiny.safetensors"  # a bare official file: no adapter.json
    official.parent.mkdir()
    save_file(flat, str(official))
    a = method.personalize(base, subject(), tmp_path / "a", adapter=official)
    assert read_manifest(a)["variant"] == "plus", "the variant follows from the keys"

    nested = {
        "image_proj": {k.removeprefix("image_proj."): v for k, v in flat.items() if k.startswith("image_proj.")},
        "ip_adapter": {k.removeprefix("ip_adapter."): v for k, v in flat.items() if k.startswith("ip_adapter.")},
    }
    pickled = tmp_path / "ip-adapter.bin"
    torch.save(nested, pickled)
    with pytest.raises(LimnerError, match="allow-pickle"):
        method.personalize(base, subject(), tmp_path / "b", adapter=pickled)
    assert not (tmp_path / "b" / "limner.json").exists(), "nothing half-written"
    b = method.personalize(base, subject(), tmp_path / "b", adapter=pickled, allow_pickle=True)
    assert read_adapter_weights(pickled, allow_pickle=True).keys() == {"image_proj", "ip_adapter"}
    assert torch.equal(load_file(str(a / EMBEDS))["image_embeds"], load_file(str(b / EMBEDS))["image_embeds"])
    # the concept records that it was encoded with --allow-pickle, but that is no permission for whoever draws
    # with it (a shared folder must not opt its reader in): drawing needs the flag again
    with pytest.raises(LimnerError, match="allow-pickle"):
        limner_image(base, b)
    assert np.array_equal(limner_image(base, a), limner_image(base, b, allow_pickle=True))


# ---------------------------------------------------------------------------------------------------------------
# Pretraining: the paper's loss, drops, frozen base
# ---------------------------------------------------------------------------------------------------------------


def test_a_short_pretrain_lowers_the_loss_and_trains_only_the_adapter(ip_base, tmp_path):
    from limner.methods.ip_adapter import IPAdapterSettings, find_image_encoder

    base = load_base(str(ip_base), device="cpu")
    unet_before = {k: v.clone() for k, v in base.pipe.unet.state_dict().items()}
    cfg = IPAdapterSettings(drop_image=0.0, drop_text=0.0, drop_both=0.0)
    train_cfg = TrainConfig(max_steps=15, batch_size=2, learning_rate=1e-2, checkpoint_every=0)
    encoder = ImageEncoder(find_image_encoder(base, None, None))
    task = _Pretraining(base, encoder, cfg, train_cfg)
    task.wrapped = {"unet": base.pipe.unet}
    batch = _batches(ToyStream(n=2), base, encoder, 2)(torch.Generator())

    @torch.no_grad()
    def held_out_loss():  # the same noise and timesteps each time
        return float(np.mean([task.loss(batch, torch.Generator().manual_seed(s)).item() for s in range(4)]))

    start = held_out_loss()
    adapter_before = [p.detach().clone() for p in task.params]
    train(task, _batches(ToyStream(n=2), base, encoder, 2), train_cfg, tmp_path)
    end = held_out_loss()
    assert end < 0.9 * start, (start, end)
    assert all(not torch.equal(a, p) for a, p in zip(adapter_before, task.params)), "projection and to_k/v_ip train"
    detach(base.pipe.unet)
    after = base.pipe.unet.state_dict()
    assert after.keys() == unet_before.keys() and all(torch.equal(after[k], v) for k, v in unet_before.items())


def test_the_official_drops_are_one_draw_per_sample():
    from limner.methods.ip_adapter import IPAdapterSettings, official_drops

    image, text = official_drops(100_000, IPAdapterSettings(), torch.Generator().manual_seed(0))
    both = (image & text).float().mean().item()
    assert abs(image.float().mean().item() - 0.10) < 0.005 and abs(text.float().mean().item() - 0.10) < 0.005
    assert abs(both - 0.05) < 0.004


def test_init_continues_from_an_adapter_and_records_it(ip_base, adapters, tmp_path):
    """init=ADAPTER: pretraining starts from its weights (at learning rate 0 they come out unchanged, up to fp16)
    and the new adapter.json names it by fingerprint; an adapter of another variant, or the output folder itself,
    is refused before any step."""
    from limner.methods.adapter import adapter_fingerprint

    method, plain = get_method("ip_adapter"), adapters["plain"]
    settings = {**QUICK, "max_steps": 1, "learning_rate": 0.0}
    continued = method.pretrain(
        load_base(str(ip_base), device="cpu"), ToyStream(), tmp_path / "on", init=str(plain), **settings
    )
    start, end = load_file(str(plain / WEIGHTS)), load_file(str(continued / WEIGHTS))
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)
    record = json.loads((continued / "adapter.json").read_text())["started_from"]
    assert record["fingerprint"] == adapter_fingerprint(plain) and record["steps"] == QUICK["max_steps"]
    with pytest.raises(LimnerError, match="is a plus adapter .* these settings train plain"):
        method.pretrain(
            load_base(str(ip_base), device="cpu"), ToyStream(), tmp_path / "x", init=str(adapters["plus"]), **QUICK
        )
    with pytest.raises(LimnerError, match="lies in --out"):  # the run would write over the weights it names
        method.pretrain(load_base(str(ip_base), device="cpu"), ToyStream(), continued, init=str(continued), **QUICK)
    assert not (tmp_path / "x").exists()


def test_pretraining_on_the_world_stream_resumes_exactly(ip_base, tmp_path):
    """The world stream through limner.data; the loop restores its position with the rest of the checkpoint.
    On the world, the pairing and captions default to what its bench measured best: cut, class captions."""
    method = get_method("ip_adapter")
    settings = {**QUICK, "max_steps": 3, "batch_size": 1, "checkpoint_every": 1}
    whole = method.pretrain(load_base(str(ip_base), device="cpu"), "world", tmp_path / "whole", **settings)
    part = tmp_path / "part"
    method.pretrain(load_base(str(ip_base), device="cpu"), "world", part, **(settings | {"max_steps": 2}))
    method.pretrain(load_base(str(ip_base), device="cpu"), "world", part, **(settings | {"resume": "latest"}))
    a, b = load_file(str(whole / WEIGHTS)), load_file(str(part / WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((whole / "adapter.json").read_text())
    assert manifest["data"]["kind"] == "world" and manifest["data"]["pair"] == "cut"
    assert manifest["data"]["captions"] == manifest["settings"]["captions"] == "class"
    assert manifest["settings"]["pair"] == "cut" and manifest["image_encoder"].endswith("image_encoder")


# ---------------------------------------------------------------------------------------------------------------
# Scales
# ---------------------------------------------------------------------------------------------------------------


def test_per_block_scales_act_only_in_the_named_blocks(ip_base, adapters, tmp_path):
    base = load_base(str(ip_base), device="cpu")
    method = get_method("ip_adapter")
    style = {"up": {"block_1": [0.0, 1.0]}}
    concept = method.personalize(base, subject(), tmp_path / "c", adapter=adapters["plain"], scale=style)
    with apply_concepts(base, [concept]):
        scales = {n.split(".transformer_blocks")[0]: p.scale for n, p in ip_processors(base.pipe.unet).items()}
    assert scales == {
        "down_blocks.0.attentions.0": [0.0],
        "mid_block.attentions.0": [0.0],
        "up_blocks.1.attentions.0": [0.0],
        "up_blocks.1.attentions.1": [1.0],
    }
    off = method.personalize(base, subject(), tmp_path / "off", adapter=adapters["plain"], scale=0.0)
    assert not np.array_equal(limner_image(base, concept), limner_image(base, off))
    # JSON text from the command line means the same
    from limner.methods.ip_adapter import IPAdapterSettings

    assert IPAdapterSettings(scale='{"up": {"block_1": [0.0, 1.0]}}').scale == style


# ---------------------------------------------------------------------------------------------------------------
# SDXL: the same code path
# ---------------------------------------------------------------------------------------------------------------


def test_sdxl_pretrains_encodes_and_draws_what_diffusers_draws(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    encoder = tiny_image_encoder(tmp_path / "clip" / "image_encoder")
    base = load_base(str(tiny_sdxl), device="cpu")
    method = get_method("ip_adapter")
    adapter = method.pretrain(base, ToyStream(), tmp_path / "adapter", image_encoder=str(encoder), **QUICK)
    assert (adapter / "image_encoder" / "config.json").is_file(), "an encoder the base lacks travels with the adapter"
    refs = references(1)
    concept = method.personalize(base, Subject("blob", "ball", refs), tmp_path / "c", adapter=adapter)
    ours = limner_image(base, concept)
    pipe = diffusers_pipe(tiny_sdxl, StableDiffusionXLPipeline)
    pipe.load_ip_adapter(str(adapter), subfolder="", weight_name=WEIGHTS)
    theirs = diffusers_image(pipe, base, ip_adapter_image=refs[0])
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() == 0


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_an_adapter_for_another_base_names_the_dimensions(ip_base, tiny_sdxl, adapters, tmp_path):
    method = get_method("ip_adapter")
    sdxl = load_base(str(tiny_sdxl), device="cpu")
    with pytest.raises(LimnerError, match="pretrained on base"):  # a limner adapter: its manifest names its base
        method.personalize(sdxl, subject(), tmp_path / "a", adapter=adapters["plain"])
    official = tmp_path / "ip.safetensors"
    shutil.copy(adapters["plain"] / WEIGHTS, official)
    with pytest.raises(LimnerError, match="cross-attention width 64 expected, 32 found"):
        method.personalize(
            sdxl, subject(), tmp_path / "b", adapter=official, image_encoder=str(ip_base / "image_encoder")
        )
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"text_model.embeddings.weight": torch.zeros(2)}, "not IP-Adapter weights"),
        ({"image_proj.extra.weight": torch.zeros(2)}, "unknown or missing image_proj keys"),
        ({"ip_adapter.9.to_k_ip.weight": torch.zeros(32, 32)}, "layers expected"),
    ],
)
def test_unknown_keys_are_refused(ip_base, adapters, tmp_path, extra, message):
    flat = load_file(str(adapters["plain"] / WEIGHTS)) | extra
    bad = tmp_path / "bad.safetensors"
    save_file(flat, str(bad))
    with pytest.raises(LimnerError, match=message):
        get_method("ip_adapter").personalize(
            load_base(str(ip_base), device="cpu"), subject(), tmp_path / "c", adapter=bad
        )


@pytest.mark.parametrize(
    ("images", "settings", "message"),
    [
        ([], {}, "no reference image"),
        ([np.zeros((1, 1, 3), np.uint8)], {}, "1x1 px"),
        (references(1), {"scale": -0.5}, "scale"),
        (references(1), {"scale": {"up": {"block_0": [0.0, -1.0]}}}, "scale"),
        (references(1), {"references": "median"}, "references"),
        (references(1), {"variant": "plus"}, "plain adapter"),
    ],
)
def test_bad_references_and_settings_fail_naming_them(ip_base, adapters, tmp_path, images, settings, message):
    base = load_base(str(ip_base), device="cpu")
    with pytest.raises(LimnerError, match=message):
        get_method("ip_adapter").personalize(
            base, Subject("blob", "ball", images), tmp_path / "c", adapter=adapters["plain"], **settings
        )
    assert not (tmp_path / "c" / "limner.json").exists()


def test_reference_files_and_a_missing_adapter(ip_base, adapters, tmp_path):
    from PIL import Image

    base = load_base(str(ip_base), device="cpu")
    good = tmp_path / "ref.png"
    Image.fromarray(references(1)[0]).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    with pytest.raises(LimnerError, match="corrupt.png could not be read"):
        IPAdapter().concept_from_files(
            base, [good, corrupt], tmp_path / "c", class_noun="ball", adapter=adapters["plain"]
        )
    concept = IPAdapter().concept_from_files(
        base, [good], tmp_path / "c", class_noun="ball", adapter=adapters["plain"]
    )
    assert read_manifest(concept)["subject"] == "ref" and (concept / "references" / "00.png").is_file()
    assert get_method("ip_adapter").prompt("a {} on the beach", concept) == "a ball on the beach"
    with pytest.raises(LimnerError, match="limner pretrain"):
        get_method("ip_adapter").personalize(base, subject(), tmp_path / "d")
    with pytest.raises(LimnerError, match="does not exist"):
        get_method("ip_adapter").personalize(base, subject(), tmp_path / "d", adapter=tmp_path / "nowhere")
