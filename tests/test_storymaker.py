"""StoryMaker (limner.methods.storymaker) on the world base: the projection's official key layout, the attention-map
loss on hand-built maps, the world data (same clothes, batches of one kind, resumable), a one-step pretrain whose file
is the official layout, faces found by the analyser (never the ground truth), two characters from one prompt, the base
given back bit for bit, and bad input (no face, several faces, more than two characters) as exit-2 errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from limner.cli import app
from limner.conditioning import apply_concepts
from limner.errors import LimnerError
from limner.generation import GenerationSettings, generate
from limner.images import write_png
from limner.methods import Subject, get_method
from limner.methods.storymaker import CHARACTERS, WEIGHTS
from limner.methods.storymaker.data import StoryStream
from limner.methods.storymaker.projection import (
    CHARACTER_TOKENS,
    ProjectionShape,
    StoryMakerProjection,
    load_official_state,
    official_state,
)
from limner.methods.storymaker.training import attention_map_loss
from limner.models.loading import load_base
from limner.world.heldout import IDENTITIES
from limner.world.render import CharacterSpec, Scene, render

QUICK = {"max_steps": 1, "batch_size": 2, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def base():
    return load_base(None, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    # two_share 1: the one step shows two characters, so the attention-map loss separates two regions
    return get_method("storymaker").pretrain(
        base, "world", tmp_path_factory.mktemp("sm") / "adapter", two_share=1.0, **QUICK
    )


def person(k: int, shirt: str = "red", framing: str = "portrait", x: float = 0.5) -> CharacterSpec:
    h = IDENTITIES[k]
    return CharacterSpec(cls=h.cls, identity=h.identity, shirt_colour=shirt, framing=framing, x=x, scale=0.85)


def picture(*people: CharacterSpec) -> np.ndarray:
    scene = Scene("grass", list(people), variant=1)
    scene.caption = "x"
    return render(scene).image


def draw(base, prompt: str, conditioning=None) -> np.ndarray:
    s = GenerationSettings(prompt, num_images=1, steps=2, batch_size=1)
    return np.asarray(generate(base, s, conditioning=conditioning).images[0])


# ---- the paper's pieces ------------------------------------------------------------------------------------------


def test_the_projection_writes_and_reads_the_official_image_proj_layout():
    shape = ProjectionShape(id_dim=16, clip_dim=32, cross_dim=64, face_depth=1, resampler_dim=64)
    torch.manual_seed(0)
    made = StoryMakerProjection(shape)
    for p in made.parameters():
        p.data.normal_()
    state = official_state(made)
    # the official faceid_plus names: MLP, perceiver over the face crop, Resampler, 3 places, one background
    for key in (
        "proj.0.weight",
        "proj.2.weight",
        "norm.weight",
        "perceiver_resampler.proj_in.weight",
        "perceiver_resampler.layers.0.0.to_kv.weight",
        "perceiver_resampler.layers.0.1.3.weight",
        "resample.latents",
        "resample.layers.3.0.to_kv.weight",
        "proj_out.weight",
        "norm_out.weight",
    ):
        assert key in state, key
    assert tuple(state["pos_embed"].shape) == (3, CHARACTER_TOKENS, 64)
    assert tuple(state["bg_embed"].shape) == (1, CHARACTER_TOKENS, 64)
    read = StoryMakerProjection(shape)
    load_official_state(read, state, "test")
    inputs = (torch.randn(2, 16), torch.randn(2, 5, 32), torch.randn(2, 5, 32))
    assert made(*inputs).shape == (3, CHARACTER_TOKENS, 64)  # background, then one group of 20 per character
    assert torch.equal(made(*inputs), read(*inputs))
    wrong = StoryMakerProjection(ProjectionShape(id_dim=8, clip_dim=32, cross_dim=64, face_depth=1, resampler_dim=64))
    with pytest.raises(LimnerError, match="proj.0.weight"):
        load_official_state(wrong, state, "test")


def test_a_new_projection_starts_with_its_residual_projection_at_zero():
    """proj_out starts at zero (official), so a new projection's tokens are the face and body tokens plus place."""
    p = StoryMakerProjection(ProjectionShape(id_dim=16, clip_dim=32, cross_dim=64, face_depth=1, resampler_dim=64))
    inputs = (torch.randn(1, 16), torch.randn(1, 5, 32), torch.randn(1, 5, 32))
    tokens = p.characters(*inputs)
    assert torch.allclose(p.norm_out(p.proj_out(tokens)), p.norm_out.bias.expand_as(tokens))


def test_the_attention_map_loss_is_zero_where_each_group_attends_to_its_own_region():
    """Two characters, left and right halves of a 4x4 map: attention exactly where each belongs costs nothing; the
    characters' attention swapped (blending's extreme) costs."""
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :, :2], masks[0, 1, :, 2:] = 1, 1
    heads = {"a": 2}
    good = torch.zeros(1, 16, 3)
    good[0, :, 1] = masks[0, 0].flatten()
    good[0, :, 2] = masks[0, 1].flatten()
    probs = good.repeat_interleave(CHARACTER_TOKENS, dim=2) / CHARACTER_TOKENS  # 20 tokens a group, rows sum to 1
    assert attention_map_loss({"a": probs.repeat(2, 1, 1)}, heads, masks, batch=1).item() < 1e-6
    swapped = probs[:, :, [*range(20), *range(40, 60), *range(20, 40)]]
    assert attention_map_loss({"a": swapped.repeat(2, 1, 1)}, heads, masks, batch=1).item() > 0.4


def test_the_world_data_keeps_the_clothes_and_draws_batches_of_one_kind():
    stream = StoryStream(seed=0, batch_size=4, two_share=0.5)
    assert stream.single.clothes == "same"  # the identity stream's second view in the same shirt
    samples = [stream.sample(k) for k in range(32)]
    for batch in range(8):
        kinds = {len(s.references) for s in samples[batch * 4 : batch * 4 + 4]}
        assert len(kinds) == 1  # image tokens line up within a batch
    assert {len(s.references) for s in samples} == {1, 2}
    two = next(s for s in samples if len(s.references) == 2)
    assert len(two.masks) == 2 and not (two.masks[0] & two.masks[1]).any()
    # the trainer takes whole batches: a position inside a batch (a sample dropped for want of a face) moves on to the
    # next batch's start, so batch j is always the stream's batch j
    stream.k = 5
    batch = stream.next_batch()
    assert stream.k == 12 and [s.subjects for s in batch] == [s.subjects for s in samples[8:12]]
    next(stream), next(stream)
    again = StoryStream(seed=0, batch_size=4, two_share=0.5)
    again.load_state_dict(stream.state_dict())
    assert np.array_equal(next(again).image, next(stream).image)


# ---- pretrain, encode, generate ----------------------------------------------------------------------------------


def test_pretraining_writes_the_official_checkpoint_layout(adapter, base):
    state = load_file(str(Path(adapter) / "storymaker.safetensors"))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in state)
    n = len(base.pipe.unet.attn_processors)
    # the official ModuleList of every attention processor: LoRA on each, image keys and values on the attn2s
    for i in range(n):
        for proj in ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"):
            assert f"ip_adapter.{i}.{proj}.down.weight" in state and f"ip_adapter.{i}.{proj}.up.weight" in state
    assert {int(k.split(".")[1]) for k in state if k.endswith("to_k_ip.weight")} == set(range(1, n, 2))
    assert "image_proj.bg_embed" in state and "image_proj.perceiver_resampler.proj_in.weight" in state
    manifest = __import__("json").loads((Path(adapter) / "adapter.json").read_text())
    assert manifest["loss_terms"][0]["characters"] == 2 and manifest["loss_terms"][0]["attention"] > 0


def test_encoding_finds_the_face_and_reads_the_analysers_mask_not_the_ground_truth(adapter, base, tmp_path):
    method = get_method("storymaker")
    image = picture(person(0))
    plain = method.personalize(base, Subject("ada", "woman", [image]), tmp_path / "a", adapter=adapter)
    wrong_mask = np.zeros(image.shape[:2], bool)
    wrong_mask[:8, :8] = True  # a ground truth that would cut out a corner: the analyser's mask is read instead
    masked = method.personalize(base, Subject("ada", "woman", [image], [wrong_mask]), tmp_path / "b", adapter=adapter)
    a, b = load_file(str(plain / CHARACTERS)), load_file(str(masked / CHARACTERS))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["id_embeds"].shape == (1, 128) and a["body_tokens"].shape[0] == 1
    cutout = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(plain / "references" / "00-character.png"))
    assert (cutout == 255).all(-1).mean() > 0.1  # the character on white, not the grass


def test_two_characters_draw_from_one_prompt_and_uninstall_bit_for_bit(adapter, base, tmp_path):
    method = get_method("storymaker")
    people = [
        Subject(h.name, h.cls, [picture(person(k, shirt))])
        for k, (h, shirt) in enumerate(zip(IDENTITIES[:2], ("red", "blue")))
    ]
    concept = method.personalize(base, people, tmp_path / "two", adapter=adapter)
    prompt = "a woman and a man on the grass"
    before = draw(base, prompt)
    with apply_concepts(base, [concept]) as applied:
        call = applied.condition(prompt, 2)
        tokens = call.pipe_kwargs["ip_adapter_image_embeds"][0]
        assert tokens.shape[:2] == (2, 3 * CHARACTER_TOKENS)  # [negative; positive] x [background, first, second]
        during = draw(base, prompt, call)
    assert not np.array_equal(before, during)
    assert np.array_equal(before, draw(base, prompt))
    one = method.personalize(base, people[0], tmp_path / "one", adapter=adapter)
    with pytest.raises(LimnerError, match="at most 2 characters"):
        with apply_concepts(base, [concept, one]):
            pass
    assert np.array_equal(before, draw(base, prompt))


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_bad_references_exit_2_naming_the_file_and_what_to_do(adapter, tmp_path):
    blank, two, ada = tmp_path / "blank.png", tmp_path / "two.png", tmp_path / "ada.png"
    write_png(np.full((64, 64, 3), 128, np.uint8), blank)
    write_png(picture(person(0, framing="full", x=0.3), person(1, "blue", framing="full", x=0.7)), two)
    write_png(picture(person(0)), ada)
    runner = CliRunner()

    def run(*images: Path):
        args = ["generate", "a woman", "--method", "storymaker", "--adapter", str(adapter), "-n", "1", "--steps", "1"]
        return runner.invoke(
            app, [*args, *sum((["--image", str(i)] for i in images), []), "--out", str(tmp_path / "o")]
        )

    r = run(blank)
    assert r.exit_code == 2 and "blank.png: no face found" in r.output and "face is visible" in r.output
    r = run(ada, ada, two)
    assert r.exit_code == 2 and "at most 2 characters" in r.output and "two.png" in r.output
    r = run(two)
    assert r.exit_code == 0, r.output
    assert "two.png: 2 faces found; took the largest" in r.output


def test_a_face_analyser_that_segments_nothing_cuts_the_character_out_with_the_users_mask():
    """insightface packs give no mask: a real photo is cut out with the mask given with the subject, else read whole;
    of several faces the largest is taken, and the note names its box."""
    from limner.encoders.faces import Face
    from limner.methods.storymaker.characters import character_pictures

    class NoMasks:
        name = "test"

        def analyse(self, images):
            crop = np.zeros((8, 8, 3), np.uint8)
            small = Face(np.array([0, 0, 4, 4.0]), np.zeros((5, 2)), torch.ones(4), None, crop)
            large = Face(np.array([2, 2, 12, 12.0]), np.zeros((5, 2)), torch.ones(4) / 2, None, crop)
            return [[small, large] for _ in images]

    picture = np.full((16, 16, 3), 40, np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:12, 6:10] = True
    given, whole = character_pictures([picture, picture], NoMasks(), ["a.png", "b.png"], [mask, None])
    assert given.mask_from == "given" and given.cutout.shape == (8, 4, 3) and (given.cutout == 40).all()
    assert whole.mask_from == "none" and whole.cutout.shape == (16, 16, 3)
    assert given.note == "a.png: 2 faces found; took the largest (box 2,2-12,12)"
    assert torch.equal(torch.from_numpy(given.id_embed), torch.ones(4) / 2)


def test_the_shipped_world_adapter_is_fp16_official_under_7_mb_and_the_default(base):
    from limner.models.loading import ASSETS

    folder = ASSETS / "world" / "adapters" / "storymaker"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 7 * 2**20 and not any("checkpoints" in p.parts for p in files)
    state = load_file(str(folder / "storymaker.safetensors"))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert {k.split(".")[0] for k in state} == {"image_proj", "ip_adapter"}
    manifest = __import__("json").loads((folder / "adapter.json").read_text())
    assert manifest["base_fingerprint"] == base.fingerprint and manifest["data"]["clothes"] == "same"
    assert get_method("storymaker").adapter_for(base, None) == folder


def test_pretraining_can_start_from_an_adapters_weights(base, adapter, tmp_path):
    """`--set init=DIR` continues from an adapter (as diffusers' --pretrained_ip_adapter_path): one step at a
    vanishing learning rate leaves its weights as they were, where a fresh start does not; an adapter of another
    shape is refused naming it."""
    method = get_method("storymaker")
    start = load_file(str(adapter / WEIGHTS))
    still = {**QUICK, "learning_rate": 1e-12, "lr_warmup_steps": 0, "seed": 5}
    folder = method.pretrain(base, "world", tmp_path / "c", init=str(adapter), **still)
    continued = load_file(str(folder / WEIGHTS))
    record = __import__("json").loads((folder / "adapter.json").read_text())["started_from"]
    assert record["path"] == str(adapter) and record["steps"] == 1 and record["started_from"] is None
    fresh = load_file(str(method.pretrain(base, "world", tmp_path / "f", **still) / WEIGHTS))
    assert continued.keys() == start.keys()
    assert all(torch.allclose(continued[k].float(), start[k].float(), atol=1e-3) for k in start)
    assert not all(torch.allclose(fresh[k].float(), start[k].float(), atol=1e-3) for k in start)
    with pytest.raises(LimnerError, match="init=.*lora_rank"):
        method.pretrain(base, "world", tmp_path / "r", init=str(adapter), lora_rank=4, **still)
