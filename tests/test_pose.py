"""StoryMaker's pose decoupling: the OpenPose skeleton drawing, the world characters' points in OpenPose's order, the
world pose ControlNet (`limner world pose`) trained and stored as a delta, StoryMaker pretraining beside it, and a
skeleton picture steering generation (`pose_image`) and leaving the base as it was."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from limner.adapters.controlnet import OPENPOSE_POINTS, draw_pose, installed_signals, pose_style
from limner.cli import app
from limner.conditioning import apply_concepts
from limner.errors import LimnerError
from limner.generation import GenerationSettings, generate
from limner.images import write_png
from limner.methods import Subject, get_method
from limner.models.loading import load_base
from limner.world.heldout import IDENTITIES
from limner.world.pose import openpose_points, pose_picture, skeletons_of
from limner.world.render import CharacterSpec, Scene, render

QUICK = {"max_steps": 1, "batch_size": 2, "checkpoint_every": 0}
P = {name: i for i, name in enumerate(OPENPOSE_POINTS)}


@pytest.fixture(scope="module")
def base():
    return load_base(None, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def pose_controlnet(tmp_path_factory):
    """A world pose ControlNet from a few steps of `limner world pose --quick` (its zero convolutions moved)."""
    root = tmp_path_factory.mktemp("pose")
    args = ["world", "pose", "--quick", "--out", str(root / "cn"), "--work", str(root / "w")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "cn"


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return get_method("storymaker").pretrain(base, "world", tmp_path_factory.mktemp("sm") / "adapter", **QUICK)


def full_figure(k: int = 0, x: float = 0.5, arms=(30.0, 120.0)) -> CharacterSpec:
    h = IDENTITIES[k]
    return CharacterSpec(cls=h.cls, identity=h.identity, shirt_colour="red", framing="full", x=x, arm_angles=arms)


def draw(base, prompt: str, conditioning=None) -> np.ndarray:
    s = GenerationSettings(prompt, num_images=1, steps=2, batch_size=1)
    return np.asarray(generate(base, s, conditioning=conditioning).images[0])


# ---- the skeleton --------------------------------------------------------------------------------------------------


def test_a_skeleton_is_drawn_in_openposes_colours_limbs_dimmed_and_unseen_points_left_out():
    person = np.full((18, 2), np.nan)
    person[P["neck"]] = (256, 200)
    person[P["right_shoulder"]] = (196, 200)  # limb 0: neck -> right shoulder, red
    person[P["nose"]] = (256, 150)  # limb 12: neck -> nose
    image = draw_pose(512, 512, [person])
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    assert tuple(image[200, 256]) == (255, 85, 0)  # the neck's own colour, full strength, on top
    assert tuple(image[200, 226]) == (153, 0, 0)  # halfway to the right shoulder: red dimmed to 60%
    assert tuple(image[200, 320]) == (0, 0, 0)  # no left shoulder, so no limb there
    assert image[400:].sum() == 0  # no hips, knees or ankles drawn
    assert pose_style(512) == (4, 4) and pose_style(64) == (1, 1)
    with pytest.raises(ValueError, match="18"):
        draw_pose(64, 64, [person[:5]])


def test_world_characters_points_are_in_openposes_order_the_persons_right_on_the_pictures_left():
    drawn = render(Scene("grass", [full_figure(arms=(30.0, 120.0))], variant=1, caption="x"))
    (points,) = skeletons_of(drawn.entities)
    assert points.shape == (18, 2)
    assert points[P["right_shoulder"], 0] < points[P["neck"], 0] < points[P["left_shoulder"], 0]
    assert points[P["right_eye"], 0] < points[P["nose"], 0] < points[P["left_eye"], 0]
    assert points[P["nose"], 1] < points[P["neck"], 1] < points[P["right_hip"], 1] < points[P["right_ankle"], 1]
    assert np.isnan(points[[P["right_ear"], P["left_ear"]]]).all()  # the world's people have no ears
    # the left arm (the person's, on the picture's right) raised to 120 degrees: its wrist above the elbow
    assert points[P["left_wrist"], 1] < points[P["left_elbow"], 1]
    portrait = render(Scene("grass", [CharacterSpec("woman", IDENTITIES[0].identity, "red")], variant=1, caption="x"))
    face_only = openpose_points(portrait.entities[0].face_keypoints, portrait.entities[0].body_keypoints)
    assert np.isnan(face_only[P["right_wrist"]]).all() and not np.isnan(face_only[P["neck"]]).any()
    picture = pose_picture([points], 128)  # drawn at 128 px from 64 px render coordinates
    x, y = (points[P["neck"]] * 2).astype(int)
    assert tuple(picture[y, x]) == (255, 85, 0)


# ---- the world pose ControlNet and StoryMaker beside it ------------------------------------------------------------


def test_the_world_pose_controlnet_trains_and_is_stored_as_a_delta_measured_with_and_without(pose_controlnet):
    files = {p.name for p in pose_controlnet.iterdir()}
    assert {"config.json", "controlnet_delta.safetensors", "build.json"} <= files
    record = json.loads((pose_controlnet / "build.json").read_text())
    assert record["steps"] == 4 and record["delta"]["energy"] == record["settings"]["energy"] == 0.8
    assert set(record["measured"]) == {"with", "without"} and record["measured"]["without"]["scale"] == 0.0


def test_storymaker_pretrains_beside_a_pose_controlnet_fed_each_targets_skeleton(base, pose_controlnet, tmp_path):
    method = get_method("storymaker")
    posed = method.pretrain(base, "world", tmp_path / "posed", pose_controlnet=str(pose_controlnet), **QUICK)
    plain = method.pretrain(base, "world", tmp_path / "plain", **QUICK)
    posed_record = json.loads((posed / "adapter.json").read_text())
    plain_record = json.loads((plain / "adapter.json").read_text())
    assert posed_record["pose_controlnet"]["path"] == str(pose_controlnet) and plain_record["pose_controlnet"] is None
    # same seed, data and weights: only the ControlNet's residuals differ, and with them the loss
    assert posed_record["loss_terms"][0]["denoise"] != plain_record["loss_terms"][0]["denoise"]
    assert not installed_signals(base.pipe.unet)  # the ControlNet taken out again
    with pytest.raises(LimnerError, match="pose_controlnet: .*none is no folder"):
        method.pretrain(base, "world", tmp_path / "x", pose_controlnet=str(tmp_path / "none"), **QUICK)


def test_a_skeleton_picture_steers_generation_and_leaves_the_base_as_it_was(base, adapter, pose_controlnet, tmp_path):
    method = get_method("storymaker")
    reference = render(Scene("grass", [CharacterSpec("woman", IDENTITIES[0].identity, "red")], variant=1, caption="x"))
    ada = Subject("ada", "woman", [reference.image])
    standing = render(Scene("beach", [full_figure(x=0.3)], variant=2, caption="x"))
    skeleton = tmp_path / "skeleton.png"
    write_png(pose_picture(skeletons_of(standing.entities), 64), skeleton)
    settings = {"adapter": adapter, "pose_controlnet": str(pose_controlnet)}
    posed = method.personalize(base, ada, tmp_path / "posed", pose_image=str(skeleton), **settings)
    plain = method.personalize(base, ada, tmp_path / "plain", **settings)
    manifest = json.loads((posed / "limner.json").read_text())
    assert (posed / manifest["pose"]["picture"]).is_file() and manifest["pose"]["source"] == str(skeleton)
    prompt = "a woman on the beach"
    before = draw(base, prompt)
    with apply_concepts(base, [plain]) as applied:
        without = draw(base, prompt, applied.condition(prompt, 2))
    with apply_concepts(base, [posed]) as applied:
        assert [s.name for s in installed_signals(base.pipe.unet)] == ["storymaker"]
        call = applied.condition(prompt, 2)
        with_pose = draw(base, prompt, call)
        method.set_call_settings(base, [posed], {"controlnet_scale": 0.0})
        switched_off = draw(base, prompt, applied.condition(prompt, 2))
    assert not np.array_equal(with_pose, without) and np.array_equal(switched_off, without)
    assert np.array_equal(before, draw(base, prompt)) and not installed_signals(base.pipe.unet)


def test_a_black_pose_image_or_a_changed_controlnet_is_a_clear_error(base, adapter, pose_controlnet, tmp_path):
    method = get_method("storymaker")
    reference = render(Scene("grass", [CharacterSpec("woman", IDENTITIES[0].identity, "red")], variant=1, caption="x"))
    black = tmp_path / "black.png"
    write_png(np.zeros((64, 64, 3), np.uint8), black)
    with pytest.raises(LimnerError, match="black.png is black"):
        method.personalize(
            base, Subject("ada", "woman", [reference.image]), tmp_path / "c", adapter=adapter, pose_image=str(black)
        )
    # a pose ControlNet changed after the concept was encoded with it: drawing names it
    moved = tmp_path / "cn"
    shutil.copytree(pose_controlnet, moved)
    skeleton = tmp_path / "skeleton.png"
    write_png(pose_picture(skeletons_of(reference.entities), 64), skeleton)
    concept = method.personalize(
        base,
        Subject("ada", "woman", [reference.image]),
        tmp_path / "posed",
        adapter=adapter,
        pose_image=str(skeleton),
        pose_controlnet=str(moved),
    )
    (moved / "build.json").write_text("{}")  # a record of how it was made: no change to the ControlNet
    with apply_concepts(base, [concept]):
        assert installed_signals(base.pipe.unet)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps(config | {"conditioning_scale_note": 1}))
    with pytest.raises(LimnerError, match="pose ControlNet .*changed since concept"):
        with apply_concepts(base, [concept]):
            pass
    assert not installed_signals(base.pipe.unet)
    result = CliRunner().invoke(
        app,
        ["generate", "a woman", "--method", "ip_adapter", "--image", str(black), "--pose-image", str(black), "-n", "1"]
        + ["--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 2 and "instantid, storymaker" in result.output


def test_the_shipped_world_pose_controlnet_is_small_fp16_and_reads_the_skeleton(base):
    """assets/world/pose_controlnet: a delta against the world UNet in fp16 under 4 MB, build.json saying how it was
    made; on fresh renders it predicts the noise better under their own skeletons than under each other's."""
    import torch
    from safetensors import safe_open

    from limner.adapters.controlnet import ControlSignal, install_controlnet, load_controlnet
    from limner.training import noise_scheduler
    from limner.training.conditioning import PromptEncoder
    from limner.world.pose import WORLD_POSE, pose_batches, read_record

    files = [p for p in WORLD_POSE.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 4 * 2**20
    with safe_open(str(WORLD_POSE / "controlnet_delta.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    record = read_record()
    assert record["steps"] == record["settings"]["steps"] and record["delta"]["energy"] == record["settings"]["energy"]
    pipe = base.pipe
    controlnet = load_controlnet(WORLD_POSE, pipe.unet)
    batch = pose_batches(16, base.resolution, base.resolution)(torch.Generator().manual_seed(7))
    with torch.no_grad():
        latents = pipe.vae.encode(batch["images"]).latent_dist.mean * pipe.vae.config.scaling_factor
        cond, kwargs = PromptEncoder(pipe, base.resolution).encode_frozen(batch["prompts"])
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        t = torch.full((16,), 600)
        noisy = noise_scheduler(pipe).add_noise(latents, noise, t)

        def error(skeletons: torch.Tensor) -> float:
            remove = install_controlnet(pipe.unet, ControlSignal(controlnet, skeletons))
            try:
                return float(((pipe.unet(noisy, t, cond, **kwargs).sample - noise) ** 2).mean())
            finally:
                remove()

        assert error(batch["poses"]) < 0.97 * error(batch["poses"].roll(1, 0))


def test_generate_draws_a_storymaker_character_on_a_skeleton_from_the_command_line(adapter, tmp_path):
    """`limner generate --method storymaker --image REF --pose-image SKELETON`: the world's pose ControlNet by default;
    --controlnet-scale 0 draws what no skeleton draws; --controlnet-scale without a skeleton is refused."""
    reference = render(Scene("grass", [CharacterSpec("woman", IDENTITIES[0].identity, "red")], variant=1, caption="x"))
    ref, skeleton = tmp_path / "ref.png", tmp_path / "skeleton.png"
    write_png(reference.image, ref)
    standing = render(Scene("beach", [full_figure(x=0.7)], variant=2, caption="x"))
    write_png(pose_picture(skeletons_of(standing.entities), 64), skeleton)
    common = ["generate", "a woman on the beach", "--method", "storymaker", "--image", str(ref), "--adapter"]
    common += [str(adapter), "-n", "1", "--steps", "3", "--seed", "1"]

    def run(name: str, *extra: str):
        result = CliRunner().invoke(app, [*common, *extra, "--out", str(tmp_path / name)])
        return result, (np.asarray(__import__("PIL.Image").Image.open(next((tmp_path / name).glob("*.png")))))

    (posed, with_pose), (off, scaled_off), (plain, without) = (
        run("posed", "--pose-image", str(skeleton)),
        run("off", "--pose-image", str(skeleton), "--controlnet-scale", "0"),
        run("plain"),
    )
    assert posed.exit_code == off.exit_code == plain.exit_code == 0, posed.output + off.output + plain.output
    assert not np.array_equal(with_pose, without) and np.array_equal(scaled_off, without)
    refused = CliRunner().invoke(app, [*common, "--controlnet-scale", "0.5", "--out", str(tmp_path / "r")])
    assert refused.exit_code == 2 and "no concept given holds a pose" in refused.output


def test_two_posed_concepts_are_refused_and_world_pose_keeps_a_users_folder(base, adapter, pose_controlnet, tmp_path):
    method = get_method("storymaker")
    skeleton = tmp_path / "skeleton.png"
    standing = render(Scene("beach", [full_figure()], variant=2, caption="x"))
    write_png(pose_picture(skeletons_of(standing.entities), 64), skeleton)
    concepts = []
    for k in range(2):
        spec = CharacterSpec("woman", IDENTITIES[k].identity, "red")
        person = render(Scene("grass", [spec], variant=1, caption="x"))
        concepts.append(
            method.personalize(
                base,
                Subject(f"p{k}", "woman", [person.image]),
                tmp_path / f"c{k}",
                adapter=adapter,
                pose_image=str(skeleton),
                pose_controlnet=str(pose_controlnet),
            )
        )
    with pytest.raises(LimnerError, match="one skeleton a picture"):
        with apply_concepts(base, concepts):
            pass
    assert not installed_signals(base.pipe.unet)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["world", "pose", "--quick", "--out", str(mine), "--work", str(tmp_path / "w")])
    assert result.exit_code == 2 and "other files" in result.output and (mine / "notes.txt").read_text() == "keep me"
