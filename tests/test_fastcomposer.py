"""FastComposer (limner.methods.fastcomposer) on the world base: the localization loss, the trigger handling and the
delayed conditioning as the official code does them, a short pretrain that lowers each loss term, the official
checkpoint's key layout, two subjects drawn from one prompt through limner.conditioning, and bad input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from limner.conditioning import apply_concepts, concept_prompt
from limner.data.multi_subject import MultiSubjectWorldStream
from limner.errors import LimnerError
from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.methods.fastcomposer import EMBEDS, FastComposerSettings
from limner.methods.fastcomposer.prompts import TRIGGER, text_only_steps, tokenize_with_triggers, with_triggers
from limner.methods.fastcomposer.training import Pretraining, SubjectBatches, balanced_l1, localization_loss
from limner.models.loading import load_base
from limner.training import TrainConfig, train

QUICK = {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0}
TWO = f"a ball {TRIGGER} and a dog {TRIGGER} on the beach"


@pytest.fixture(scope="module")
def base():
    return load_base(None, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return get_method("fastcomposer").pretrain(base, "world", tmp_path_factory.mktemp("fc") / "adapter", **QUICK)


def world_subjects(n: int, seed: int = 3) -> list[Subject]:
    """The subjects of a world scene of n, each with its picture and mask as references."""
    stream = MultiSubjectWorldStream(seed=seed)
    sample = next(s for s in map(stream.sample, range(50)) if len(s.masks) == n)
    nouns = [sample.text[:end].split()[-1] for end in sample.noun_ends]
    return [Subject(f"s{k}", noun, [sample.image], [sample.masks[k]]) for k, noun in enumerate(nouns)]


# ---- the paper's pieces, checked against the official code -------------------------------------------------------


def test_the_localization_loss_is_lower_when_attention_sits_inside_the_mask():
    """A hand-built 4x4 map: all of the noun's attention on the subject's pixels, then all on the background."""
    mask = torch.zeros(1, 4, 4)
    mask[0, 1:3, 1:3] = 1
    inside, outside = torch.zeros(1, 16, 5), torch.zeros(1, 16, 5)
    inside[0, mask.flatten().bool(), 2] = 1 / 4
    outside[0, ~mask.flatten().bool(), 2] = 1 / 12
    rows, tokens = torch.tensor([0]), torch.tensor([2])
    good = localization_loss({"a": inside}, mask, rows, tokens, batch=1)
    bad = localization_loss({"a": outside}, mask, rows, tokens, batch=1)
    assert good < 0 < bad
    assert good == pytest.approx(-1 / 4, abs=1e-3) and bad == pytest.approx(1 / 12, abs=1e-3)
    # another token's attention does not count
    assert localization_loss({"a": inside}, mask, rows, torch.tensor([3]), batch=1) == pytest.approx(0, abs=1e-6)
    assert balanced_l1(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == pytest.approx(0, abs=1e-4)


def official_tokenize(tokenizer, caption: str, noun_ends: list[int]) -> tuple[list[int], list[int]]:
    """The official data code, transcribed: <|image|> inserted at each noun's end as a special token, then removed,
    the token before it flagged."""
    for end in reversed(noun_ends):
        caption = caption[:end] + "<|image|>" + caption[end:]
    tokenizer.add_tokens(["<|image|>"], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<|image|>")
    input_ids = tokenizer.encode(caption)
    mask, clean, clean_index = [False] * len(input_ids), [], 0
    for token in input_ids:
        if token == image_token_id:
            mask[clean_index - 1] = True
        else:
            clean.append(token)
            clean_index += 1
    clean += [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(clean))
    return clean, [i for i, m in enumerate(mask) if m]


def test_trigger_positions_match_the_official_code(base):
    import copy

    tokenizer = base.pipe.tokenizer
    caption = "a portrait of a man on the left and a red ball, a box and a teddy in the snow"
    ends = [len("a portrait of a man"), len(caption.split(" on the left")[0] + " on the left and a red ball")]
    ends.append(caption.index(" and a teddy"))
    ends.append(caption.index(" in the snow"))
    expected = official_tokenize(copy.deepcopy(tokenizer), caption, ends)
    ids, positions = tokenize_with_triggers(tokenizer, with_triggers(caption, ends))
    assert (ids, positions) == expected
    assert [tokenizer.decode([ids[p]]) for p in positions] == ["man", "ball", "box", "teddy"]
    assert len(base.pipe.tokenizer) == len(tokenizer)  # the base's own tokenizer gained no token


@pytest.mark.parametrize("alpha", [0.6, 0.7, 0.8, 1.0])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_the_text_only_steps_are_the_official_pipelines(alpha, steps):
    start = (1 - alpha) * steps  # the official pipeline: `if i <= start_merge_step:` the text-only embeddings
    official = [i for i in range(steps) if i <= start]
    assert text_only_steps(alpha, steps) == min(len(official), steps - 1)


def test_delayed_conditioning_switches_at_the_right_step(base, adapter, tmp_path):
    """The UNet sees the text-only prompt for the first (1 - alpha) of the steps, then the subjects fused in."""
    method = get_method("fastcomposer")
    concept = method.encode(base, adapter, world_subjects(2), tmp_path / "c", alpha=0.7)
    seen = []
    hook = base.pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"][-1].clone()), with_kwargs=True
    )
    try:
        with apply_concepts(base, [concept]) as applied:
            conditioning = applied.condition(TWO, 10)
            assert conditioning.layout_prompt == "a ball and a dog on the beach"
            assert conditioning.layout_steps == 4  # i <= 3.0000000000000004
            fused = conditioning.pipe_kwargs["prompt_embeds"][0]
            settings = GenerationSettings(prompt=TWO, num_images=1, steps=10, scheduler="ddim")
            generate(base, settings, conditioning=conditioning)
            text_only = base.pipe.encode_prompt(conditioning.layout_prompt, "cpu", 1, False)[0][0]
    finally:
        hook.remove()
    assert len(seen) == 10
    assert all(torch.allclose(s, text_only) for s in seen[:4])
    assert all(torch.allclose(s, fused) for s in seen[4:])
    assert not torch.allclose(fused, text_only)


# ---- pretraining ------------------------------------------------------------------------------------------------


def test_a_short_pretrain_on_the_world_lowers_each_loss_term(base, tmp_path):
    """Both terms on one fixed world batch (the same timesteps and noise), before and after 12 steps on it."""
    method = get_method("fastcomposer")
    cfg = FastComposerSettings(mask_loss_prob=0.0, uncondition_prob=0.0, object_appear_prob=1.0, pair="self")
    train_cfg = TrainConfig(max_steps=12, batch_size=2, learning_rate=1e-3, checkpoint_every=0)
    from limner.methods.fastcomposer import subject_encoder

    encoder = subject_encoder(base, None, None, None, "the base")
    task = Pretraining(base, encoder, replace(cfg, localization_weight=0.1), train_cfg)
    stream = MultiSubjectWorldStream(seed=1, pair="self")
    samples = [stream.sample(k) for k in range(4) if len(stream.sample(k).masks) >= 2][:2]
    batch = SubjectBatches(samples, base, lambda crops: encoder.pixels(crops).cpu(), cfg, 2)(torch.Generator())
    try:

        def terms() -> dict:  # averaged over 4 draws of timesteps and noise, the same draws each time
            task.wrapped = task.modules()
            with torch.no_grad():
                for seed in range(4):
                    task.loss(batch, torch.Generator().manual_seed(seed))
            drawn, task.terms[-4:] = task.terms[-4:], []
            return {k: np.mean([t[k] for t in drawn]) for k in ("denoise", "localization")}

        before = terms()
        train(task, lambda generator: batch, train_cfg, tmp_path, method.name)
        after = terms()
    finally:
        task.close()
    assert after["denoise"] < before["denoise"]
    assert after["localization"] < before["localization"]
    assert method.name in {"fastcomposer"} and not getattr(base.pipe.unet, "peft_config", None)


def test_the_adapter_is_the_official_prefixes_with_a_unet_lora_and_small(adapter):
    import json

    from safetensors.torch import load_file

    state = load_file(str(adapter / "fastcomposer.safetensors"))
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"unet", "image_encoder", "postfuse_module"}
    assert all(v.dtype == torch.float16 for v in state.values())
    assert all(".lora_A." in k or ".lora_B." in k for k in state if k.startswith("unet."))
    trained = {k.split(".layers.")[1].split(".")[0] for k in state if k.startswith("image_encoder.")}
    assert trained == {"2", "3"}  # the world encoder's last 2 of 4 layers
    assert (adapter / "fastcomposer.safetensors").stat().st_size < 8e6
    manifest = json.loads((adapter / "adapter.json").read_text())
    assert manifest["localization_blocks"] == [
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    ]
    assert {"denoise", "localization"} <= set(manifest["loss_terms"][0])


def test_init_continues_from_an_adapter_and_records_it(base, adapter, tmp_path):
    """init=ADAPTER: pretraining starts from its weights (at learning rate 0 they come out unchanged) and the new
    adapter.json names it by fingerprint; an adapter of another LoRA rank is refused before any step."""
    import json

    from safetensors.torch import load_file

    from limner.methods.adapter import adapter_fingerprint

    method = get_method("fastcomposer")
    settings = {**QUICK, "max_steps": 1, "learning_rate": 0.0}
    continued = method.pretrain(base, "world", tmp_path / "continued", init=str(adapter), **settings)
    start, end = (load_file(str(a / "fastcomposer.safetensors")) for a in (adapter, continued))
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)
    assert any(v.abs().sum() > 0 for k, v in start.items() if ".lora_B." in k), "a trained start, not zeros"
    record = json.loads((continued / "adapter.json").read_text())["started_from"]
    assert record["fingerprint"] == adapter_fingerprint(adapter) and record["steps"] == QUICK["max_steps"]
    with pytest.raises(LimnerError, match="does not fit these settings .*lora_rank"):
        method.pretrain(base, "world", tmp_path / "other-rank", init=str(adapter), lora_rank=4, **QUICK)


# ---- the official checkpoint ------------------------------------------------------------------------------------


def official_checkpoint(base, path: Path, drop: int = 0) -> dict:
    """The official pytorch_model.bin layout built from the world's modules (every UNet weight nudged, so loading
    it shows), `drop` keys left out."""
    from limner.adapters import FuseMLP
    from limner.methods.ip_adapter import ImageEncoder

    encoder = ImageEncoder(Path(base.path) / "image_encoder")
    torch.manual_seed(0)
    fuse = FuseMLP(256, 256)
    state = {f"unet.{k}": v + 0.01 for k, v in base.pipe.unet.state_dict().items()}
    state |= {f"text_encoder.{k}": v.clone() for k, v in base.pipe.text_encoder.state_dict().items()}
    state |= {f"image_encoder.{k}": v.clone() for k, v in encoder.model.state_dict().items()}
    state |= {f"postfuse_module.{k}": v for k, v in fuse.state_dict().items()}
    for key in sorted(state)[:drop]:
        del state[key]
    torch.save(state, path)
    return state


def test_the_official_checkpoint_layout_loads_only_with_allow_pickle(base, tmp_path):
    method = get_method("fastcomposer")
    state = official_checkpoint(base, tmp_path / "pytorch_model.bin")
    subjects = world_subjects(2)
    with pytest.raises(LimnerError, match="pickle.*--allow-pickle"):
        method.personalize(base, subjects, tmp_path / "c0", adapter=tmp_path / "pytorch_model.bin")
    concept = method.personalize(
        base, subjects, tmp_path / "c", adapter=tmp_path / "pytorch_model.bin", allow_pickle=True
    )
    key = "conv_in.weight"
    original = base.pipe.unet.state_dict()[key].clone()
    with pytest.raises(LimnerError, match="allow-pickle"):  # what the concept recorded is no permission to draw
        apply_concepts(base, [concept])
    with apply_concepts(base, [concept], allow_pickle=True) as applied:
        assert torch.equal(base.pipe.unet.state_dict()[key], state[f"unet.{key}"])
        embeds = applied.condition(TWO, 10).pipe_kwargs["prompt_embeds"]
        assert embeds.shape == (1, base.pipe.tokenizer.model_max_length, 256)
    assert torch.equal(base.pipe.unet.state_dict()[key], original)  # the base's own UNet is back


def test_an_official_checkpoint_with_missing_keys_lists_them(base, tmp_path):
    official_checkpoint(base, tmp_path / "pytorch_model.bin", drop=3)
    with pytest.raises(LimnerError, match=r"misses 3 image_encoder weights, e\.g\. image_encoder\.vision_model"):
        get_method("fastcomposer").personalize(
            base, world_subjects(1), tmp_path / "c", adapter=tmp_path / "pytorch_model.bin", allow_pickle=True
        )


# ---- generation ------------------------------------------------------------------------------------------------


def test_two_subjects_from_one_prompt_through_conditioning(base, adapter, tmp_path):
    """encode -> concept -> generate through limner.conditioning, as eval and generate do; each subject changes
    the image, and the bench's prompt for a one-subject concept carries the trigger."""
    method = get_method("fastcomposer")
    subjects = world_subjects(2)
    both = method.encode(base, adapter, subjects, tmp_path / "both")
    one = [method.encode(base, adapter, [s], tmp_path / f"one{k}") for k, s in enumerate(subjects)]
    settings = GenerationSettings(prompt=TWO, num_images=1, steps=6)
    drawn = {}
    for name, concepts in {"both": [both], "apart": one, "swapped": one[::-1]}.items():
        with apply_concepts(base, concepts) as applied:
            drawn[name] = np.asarray(generate(base, settings, conditioning=applied.condition(TWO, 6)).images[0])
    assert np.array_equal(drawn["both"], drawn["apart"])  # one concept of two subjects, or two of one
    assert not np.array_equal(drawn["apart"], drawn["swapped"])  # the k-th trigger takes the k-th subject
    assert concept_prompt(one[0], "a {} on the beach") == f"a {subjects[0].class_noun} {TRIGGER} on the beach"
    assert not getattr(base.pipe.unet, "peft_config", None)  # uninstalled


def test_subject_scale_pushes_each_subject_token_from_its_word(base, adapter, tmp_path):
    """limner's subject_scale: 0 leaves the words alone, 1 is the paper's fused token, 2 lies twice as far from the
    word; no other token moves."""
    method = get_method("fastcomposer")
    subjects = world_subjects(2)
    embeds = {}
    for scale in (0.0, 1.0, 2.0):
        concept = method.encode(base, adapter, subjects, tmp_path / f"s{scale}", subject_scale=scale)
        installation = method.install(base, [concept])
        try:
            embeds[scale] = method.condition(base, [concept], TWO)["prompt_embeds"].float()
        finally:
            installation.uninstall()
    _, positions = tokenize_with_triggers(base.pipe.tokenizer, TWO)
    moved = (embeds[1.0] - embeds[0.0]).abs().amax(-1)[0]
    assert sorted(torch.nonzero(moved > 1e-6).flatten().tolist()) == positions
    assert torch.allclose(embeds[2.0] - embeds[0.0], 2 * (embeds[1.0] - embeds[0.0]), atol=1e-4)


def test_subject_boxes_change_the_drawing_and_leave_the_unet_as_it_was(base, adapter, tmp_path):
    """limner's subject_boxes: box attention is on while the concepts are installed (a different image from the same
    seed), off after; a prompt whose subjects the boxes do not match, or a malformed box, is a clear error."""
    method = get_method("fastcomposer")
    subjects = world_subjects(2)
    settings = GenerationSettings(prompt=TWO, num_images=1, steps=4)
    processors = {n: type(p) for n, p in base.pipe.unet.attn_processors.items()}
    drawn = {}
    for boxes in (None, "columns"):
        concept = method.encode(base, adapter, subjects, tmp_path / str(boxes), subject_boxes=boxes)
        with apply_concepts(base, [concept]) as applied:
            drawn[boxes] = np.asarray(generate(base, settings, conditioning=applied.condition(TWO, 4)).images[0])
    assert not np.array_equal(drawn[None], drawn["columns"])
    assert {n: type(p) for n, p in base.pipe.unet.attn_processors.items()} == processors
    one_box = method.encode(base, adapter, subjects, tmp_path / "one", subject_boxes="0,0,0.5,1")
    with pytest.raises(LimnerError, match="gives 1 boxes for 2 subjects"):
        with apply_concepts(base, [one_box]) as applied:
            applied.condition(TWO, 4)
    assert {n: type(p) for n, p in base.pipe.unet.attn_processors.items()} == processors
    with pytest.raises(LimnerError, match="is not a box"):
        method.encode(base, adapter, subjects, tmp_path / "bad", subject_boxes="left,right")


def test_generate_draws_two_subjects_from_two_image_files(base, adapter, tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from limner.cli import app

    paths = []
    for k, subject in enumerate(world_subjects(2)):
        paths.append(tmp_path / f"ref{k}.png")
        Image.fromarray(subject.images[0]).save(paths[-1])
    args = ["generate", TWO, "--method", "fastcomposer", "--adapter", str(adapter), "-n", "1", "--steps", "4"]
    args += ["--out", str(tmp_path / "out")] + [a for p in paths for a in ("--image", str(p))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert record["settings"]["layout_prompt"] == "a ball and a dog on the beach"
    one = CliRunner().invoke(app, [*args[:1], f"a ball {TRIGGER} on the beach", *args[2:]])
    assert one.exit_code == 2 and "2 subjects" in one.output and "1 trigger" in one.output
    none = CliRunner().invoke(app, [*args[:1], "a ball and a dog on the beach", *args[2:]])
    assert none.exit_code == 2 and "no trigger <|image|>" in none.output
    # --set gives the method's settings to the references encoded on the fly: box attention draws another image
    boxed = CliRunner().invoke(
        app, [*args[:-6], "--out", str(tmp_path / "boxed"), *args[-4:], "--set", "subject_boxes=columns"]
    )
    assert boxed.exit_code == 0, boxed.output
    drawn = [np.asarray(Image.open(next((tmp_path / d).glob("*-00.png")))) for d in ("out", "boxed")]
    assert not np.array_equal(*drawn)
    record = json.loads(next((tmp_path / "boxed").glob("*.json")).read_text())  # the record says what drew it
    assert [c["method"] for c in record["concepts"]] == ["fastcomposer"]
    assert record["concepts"][0]["config"]["subject_boxes"] == "columns"
    unused = CliRunner().invoke(app, ["generate", "a ball", "--set", "subject_scale=2", "--out", str(tmp_path / "x")])
    assert unused.exit_code == 2 and "--set is for --image" in unused.output


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_bad_input_gets_clear_errors(base, adapter, tmp_path):
    method = get_method("fastcomposer")
    subject = world_subjects(1)[0]
    empty = Subject("empty", "ball", subject.images, [np.zeros_like(subject.masks[0])])
    with pytest.raises(LimnerError, match="mask is empty.*no subject"):
        method.encode(base, adapter, [empty], tmp_path / "e")
    flat = Subject("flat", "ball", [np.full((32, 32, 3), 120, np.uint8)])
    with pytest.raises(LimnerError, match="flat colour.*no subject"):
        method.encode(base, adapter, [flat], tmp_path / "f")
    concept = method.encode(base, adapter, [subject], tmp_path / "c")
    assert (concept / EMBEDS).is_file()
    with apply_concepts(base, [concept]) as applied:
        assert applied.condition("a ball on the beach", 10).pipe_kwargs == {}  # no subject named: none drawn
        with pytest.raises(LimnerError, match="2 triggers.*only 1 subject"):
            applied.condition(TWO, 10)
        with pytest.raises(LimnerError, match="follows no word"):
            applied.condition(f"{TRIGGER} on the beach", 10)
    with pytest.raises(LimnerError, match="alpha"):
        method.encode(base, adapter, [subject], tmp_path / "a", alpha=0)


def test_the_shipped_world_adapter_is_small_fp16_and_recorded():
    """assets/world/adapters/fastcomposer: the official prefixes in fp16 under 8 MB, and adapter.json saying what
    made it, all four stages (scripts/pretrain_fastcomposer.sh reproduces it)."""
    import json

    from limner.methods.fastcomposer.weights import read_weights

    folder = get_method("fastcomposer").shipped_adapter({})
    assert folder is not None
    assert sum(p.stat().st_size for p in folder.iterdir()) < 8e6
    parts = read_weights(folder)
    assert all(v.dtype == torch.float16 for part in parts.values() for v in part.values())
    manifest = json.loads((folder / "adapter.json").read_text())
    assert manifest["method"] == "fastcomposer" and manifest["data"]["kind"] == "world"
    assert manifest["steps"] == manifest["train"]["max_steps"] == 5000 and manifest["train"]["lr_schedule"] == "cosine"
    from helpers import lineage

    stages = [record["steps"] for record in lineage(manifest)]
    seeds = [record["train"]["seed"] for record in lineage(manifest)]
    pairs = [record["settings"]["pair"] for record in lineage(manifest)]
    assert stages == [5000, 5000, 7000, 5000, 5000, 2400], "stage 6 of the script, from stages 5 to 1"
    assert seeds == [5, 4, 3, 2, 1, 0], "fresh samples each stage"
    assert pairs == ["self"] * 2 + ["view"] * 4, "the paper's pairing from stage 5 on"
    assert manifest["lora"]["rank"] == 32 and manifest["settings"]["localization_weight"] == 1e-3


def test_an_adapter_with_lora_weights_missing_is_refused_and_the_unet_left_as_it_was(base):
    """A LoRA module without its weights would keep lora_B at zero and silently do nothing there: an error
    naming the adapter, and the UNet without the half-installed LoRA."""
    import json

    from limner.methods.fastcomposer.weights import load_unet_lora, read_weights

    folder = get_method("fastcomposer").shipped_adapter({})
    lora = json.loads((folder / "adapter.json").read_text())["lora"]
    unet_state = read_weights(folder)["unet"]
    dropped = next(k for k in unet_state if "lora_B" in k)
    keys_before = set(base.pipe.unet.state_dict())
    with pytest.raises(LimnerError, match="FastComposer adapter .*no weights for 1 LoRA tensors"):
        load_unet_lora(base.pipe.unet, {k: v for k, v in unet_state.items() if k != dropped}, lora, folder)
    assert set(base.pipe.unet.state_dict()) == keys_before
