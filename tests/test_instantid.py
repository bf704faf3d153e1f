"""InstantID (limner.methods.instantid) and the shared ControlNet layer (limner.adapters.controlnet), on the tiny
random pipeline with world portraits as references: the keypoints are drawn as the official code draws them, the
IdentityNet's residuals enter every UNet call (and only while installed), what pretraining writes is the official
layout that diffusers loads, the official pickled file is read only with allow_pickle, references are averaged and
the pose follows the reference or another picture, and bad input gets specific errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from limner.adapters import ip_layer_ids, projection_state_dict
from limner.adapters.controlnet import (
    KPS_COLOURS,
    ControlSignal,
    controlnet_from_unet,
    draw_kps,
    install_controlnet,
    installed_signals,
    kps_style,
)
from limner.cli import app
from limner.concepts import read_manifest
from limner.conditioning import apply_concepts
from limner.encoders.faces import face_analysis
from limner.errors import LimnerError
from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.methods.instantid import EMBEDS
from limner.methods.instantid.training import id_projection
from limner.methods.instantid.weights import CONTROLNET, WEIGHTS
from limner.models.loading import load_base

QUICK = {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "checkpoint_every": 0, "resampler_dim": 64}


@pytest.fixture(scope="module")
def portraits() -> list[np.ndarray]:
    """World character pictures in which the world face analyser finds one face (a fixed draw of the stream)."""
    from limner.data import open_stream

    stream = iter(open_stream("world", pair="view", subjects="characters", clothes="vary", seed=7))
    pictures = [next(stream).image for _ in range(12)]
    found = face_analysis(None).analyse(pictures)
    return [p for p, faces in zip(pictures, found) if len(faces) == 1][:4]


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    """An InstantID adapter for the tiny base, two steps on the world's identity stream (a large learning rate, so
    the IdentityNet's zero convolutions have moved)."""
    out = tmp_path_factory.mktemp("instantid") / "adapter"
    return get_method("instantid").pretrain(load_base(str(tiny_base), device="cpu"), "world", out, **QUICK)


def draw(base, prompt="a portrait of a person", conditioning=None, **kw) -> np.ndarray:
    s = GenerationSettings(prompt, num_images=1, steps=2, batch_size=1, **kw)
    return np.asarray(generate(base, s, conditioning=conditioning).images[0])


def subject(pictures, name="p") -> Subject:
    return Subject(name, "person", list(pictures))


# ---- the keypoint drawing -------------------------------------------------------------------------------------


def test_keypoints_are_drawn_as_the_official_code_draws_them():
    kps = np.array([[80.0, 100.0], [176.0, 100.0], [128.0, 150.0], [96.0, 200.0], [160.0, 200.0]])
    image = draw_kps(256, 256, kps, stickwidth=4, radius=10)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    for (x, y), colour in zip(kps.astype(int), KPS_COLOURS):  # a full-colour disc on each point
        assert tuple(image[y, x]) == colour and tuple(image[y + 8, x]) == colour
    # each limb to the nose in its first point's colour, dimmed to 60% (red eye -> nose: 153, 0, 0)
    mid = ((kps[0] + kps[2]) / 2).astype(int)
    assert tuple(image[mid[1], mid[0]]) == (153, 0, 0)
    assert image[0, 0].sum() == 0 and image[250, 5].sum() == 0  # black elsewhere
    assert kps_style(1024) == (4, 10) and kps_style(512) == (2, 5) and kps_style(64) == (1, 1)
    with pytest.raises(ValueError, match="5"):
        draw_kps(64, 64, kps[:3])


# ---- the ControlNet layer -------------------------------------------------------------------------------------


def _unet_call(unet, **kw):
    torch.manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    return unet(x, torch.tensor([10, 500]), encoder_hidden_states=text, **kw).sample, (x, text)


def test_controlnet_residuals_enter_every_unet_call_while_installed(tiny_base):
    unet = load_base(str(tiny_base), device="cpu").pipe.unet
    bare, (x, text) = _unet_call(unet)
    net = controlnet_from_unet(unet)
    cond = torch.rand(1, 3, 64, 64)
    remove = install_controlnet(unet, ControlSignal(net, cond, scale=0.7))
    assert torch.equal(_unet_call(unet)[0], bare), "a new ControlNet (zero convolutions) changes nothing"
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        hooked = _unet_call(unet)[0]
        remove()
        # the very residuals diffusers' ControlNet pipelines hand the UNet, the condition repeated over the batch
        down, mid = net(
            x, torch.tensor([10, 500]), text, controlnet_cond=cond.repeat(2, 1, 1, 1), conditioning_scale=0.7,
            return_dict=False,
        )  # fmt: skip
        by_hand = _unet_call(unet, down_block_additional_residuals=down, mid_block_additional_residual=mid)[0]
        assert torch.allclose(hooked, by_hand, atol=1e-5) and not torch.allclose(hooked, bare, atol=1e-3)
        assert torch.equal(_unet_call(unet)[0], bare), "removed, the UNet is back bit for bit"
        assert not hasattr(unet, "_limner_control_hook") and installed_signals(unet) == []

        # two signals sum (with residuals the caller passed too); a scale of 0 runs no ControlNet pass at all
        calls = []
        net.register_forward_hook(lambda *a: calls.append(1))
        first = install_controlnet(unet, ControlSignal(net, cond, scale=0.7))
        second = install_controlnet(unet, ControlSignal(net, cond, scale=0.0))
        assert torch.allclose(_unet_call(unet)[0], hooked, atol=1e-5) and len(calls) == 1
        installed_signals(unet)[1].scale = 0.7
        both = _unet_call(unet, down_block_additional_residuals=[2 * d for d in down])[0]
        assert len(calls) == 3
        first(), second()
        by_hand = _unet_call(
            unet, down_block_additional_residuals=[4 * d for d in down], mid_block_additional_residual=2 * mid
        )[0]
        assert torch.allclose(both, by_hand, atol=1e-4)


# ---- the adapter: official layout -----------------------------------------------------------------------------


def test_pretraining_writes_the_official_layout_that_diffusers_loads(adapter, tiny_base):
    from diffusers import ControlNetModel

    unet = load_base(str(tiny_base), device="cpu").pipe.unet
    net = ControlNetModel.from_pretrained(adapter / CONTROLNET)
    stored = load_file(str(adapter / CONTROLNET / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in stored.values()) and len(stored) == len(net.state_dict())
    assert net.config.block_out_channels == unet.config.block_out_channels
    state = load_file(str(adapter / WEIGHTS))
    assert all(v.dtype == torch.float16 for v in state.values())
    # the Resampler under the official names, reading the world face analyser's 128-d embedding, 16 ID tokens
    assert state["image_proj.latents"].shape == (1, 16, 64)
    assert state["image_proj.proj_in.weight"].shape == (64, 128)
    assert state["image_proj.proj_out.weight"].shape == (32, 64)
    for i in range(4):
        assert state[f"image_proj.layers.{i}.0.to_kv.weight"].shape == (128, 64)
        assert state[f"image_proj.layers.{i}.1.3.weight"].shape == (64, 256)
    # ip_adapter.{i}: i the position of each attn2 in unet.attn_processors, as the official pipeline's ModuleList
    names = list(unet.attn_processors)
    ip = {k.removeprefix("ip_adapter.") for k in state if k.startswith("ip_adapter.")}
    assert ip == {f"{i}.{p}.weight" for i in ip_layer_ids(unet).values() for p in ("to_k_ip", "to_v_ip")}
    assert all(names[int(k.split(".")[0])].endswith("attn2.processor") for k in ip)
    manifest = read_manifest_json(adapter)
    assert manifest["method"] == "instantid" and manifest["steps"] == 2 and manifest["embedding_dim"] == 128


def read_manifest_json(folder):
    import json

    return json.loads((folder / "adapter.json").read_text())


def test_the_official_pickled_file_needs_allow_pickle_and_draws_the_same(adapter, tiny_base, portraits, tmp_path):
    state = load_file(str(adapter / WEIGHTS))
    official = tmp_path / "InstantID"
    official.mkdir()
    nested = {
        part: {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
        for part in ("image_proj", "ip_adapter")
    }
    torch.save(nested, official / "ip-adapter.bin")
    shutil.copytree(adapter / CONTROLNET, official / CONTROLNET)
    method, base = get_method("instantid"), load_base(str(tiny_base), device="cpu")
    with pytest.raises(LimnerError, match="allow-pickle"):
        method.personalize(base, subject(portraits[:1]), tmp_path / "refused", adapter=official)
    from_bin = method.personalize(base, subject(portraits[:1]), tmp_path / "bin", adapter=official, allow_pickle=True)
    ours = method.personalize(base, subject(portraits[:1]), tmp_path / "ours", adapter=adapter)
    drawn = []
    for concept, allow in ((from_bin, True), (ours, False)):
        with apply_concepts(base, [concept], allow_pickle=allow) as applied:
            drawn.append(draw(base, conditioning=applied.condition("a portrait of a person", 2)))
    assert np.array_equal(*drawn)


# ---- encoding and generation ----------------------------------------------------------------------------------


def test_references_are_averaged_and_the_pose_follows_the_reference_or_another_picture(
    adapter, tiny_base, portraits, tmp_path
):
    method, base = get_method("instantid"), load_base(str(tiny_base), device="cpu")
    faces = [f[0] for f in face_analysis(None).analyse(portraits[:2])]
    t0 = __import__("time").perf_counter()
    concept = method.personalize(base, subject(portraits[:2]), tmp_path / "two", adapter=adapter)
    assert __import__("time").perf_counter() - t0 < 10, "encoding takes seconds, no training"
    embeds = load_file(str(concept / EMBEDS))
    # the mean of the unit embeddings, at the norm the adapter was pretrained with (sqrt(128): the official scale)
    norm = read_manifest_json(adapter)["embedding_norm"]
    assert norm == pytest.approx(128**0.5, abs=1e-5)
    wanted = (faces[0].embedding + faces[1].embedding) / 2 * norm
    assert torch.allclose(embeds["image_embeds"][0, 0], wanted, atol=1e-4)
    assert embeds["negative_image_embeds"].abs().sum() == 0  # the official unconditional input: a zero embedding
    pose = read_manifest(concept)["pose"]
    assert np.allclose(pose["keypoints"], faces[0].keypoints, atol=1e-3) and pose["size"] == [64, 64]

    posed = tmp_path / "pose.png"
    Image.fromarray(portraits[2]).save(posed)
    other = method.personalize(
        base, subject(portraits[:1]), tmp_path / "posed", adapter=adapter, pose_image=str(posed)
    )
    wanted = face_analysis(None).analyse([portraits[2]])[0][0].keypoints
    assert np.allclose(read_manifest(other)["pose"]["keypoints"], wanted, atol=1e-3)

    # the pose reaches the picture through the IdentityNet (its weights moved well away from the zero convolutions'
    # start, the same way in both), and its scale 0 runs no ControlNet pass
    same_face = method.personalize(base, subject(portraits[:1]), tmp_path / "own", adapter=adapter)
    pictures = {}
    for name, concept in (("own", same_face), ("posed", other)):
        with apply_concepts(base, [concept]) as applied:
            net = installed_signals(base.pipe.unet)[0].controlnet
            torch.manual_seed(0)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            pictures[name] = draw(base, conditioning=applied.condition("a portrait of a person", 2))
            calls: list = []
            hook = net.register_forward_hook(lambda *a, calls=calls: calls.append(1))
            method.set_call_settings(base, [concept], {"controlnet_scale": 0.0})
            pictures[f"{name} off"] = draw(base, conditioning=applied.condition("a portrait of a person", 2))
            hook.remove()
            assert calls == []
    assert not np.array_equal(pictures["own"], pictures["posed"])
    assert np.array_equal(pictures["own off"], pictures["posed off"])  # same face, no IdentityNet: the same picture
    assert not np.array_equal(pictures["own"], pictures["own off"])


# ---- bad input ------------------------------------------------------------------------------------------------


def test_bad_references_and_pose_pictures_get_errors_naming_them(adapter, tiny_base, portraits, tmp_path):
    method, base = get_method("instantid"), load_base(str(tiny_base), device="cpu")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(blank)
    with pytest.raises(LimnerError, match=r"blank\.png: no face found"):
        method.concept_from_files(base, [blank], tmp_path / "c1", class_noun="person", adapter=adapter)

    # two people side by side (the world's two-character renders): the largest face taken, and the note says which
    from limner.world.faces import two_character_renders

    group = two_character_renders(0, n=1)[0][0]
    assert len(face_analysis(None).analyse([group])[0]) == 2
    two = tmp_path / "two.png"
    Image.fromarray(group).save(two)
    with pytest.warns(UserWarning, match=r"two\.png: 2 faces found; took the largest \(box"):
        method.concept_from_files(base, [two], tmp_path / "c2", class_noun="person", adapter=adapter)

    ref = tmp_path / "ref.png"
    Image.fromarray(portraits[0]).save(ref)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(portraits[1][:8, :8]).save(tiny)
    with pytest.raises(LimnerError, match=r"pose image .*tiny\.png is 8x8 px"):
        method.concept_from_files(
            base, [ref], tmp_path / "c3", class_noun="person", adapter=adapter, pose_image=str(tiny)
        )
    with pytest.raises(LimnerError, match=r"pose image .*blank\.png: no face found"):
        method.concept_from_files(
            base, [ref], tmp_path / "c4", class_noun="person", adapter=adapter, pose_image=str(blank)
        )
    # a pose whose face the crop to the picture asked cuts off: the face at the left edge, a tall narrow picture
    edge = tmp_path / "edge.png"
    Image.fromarray(np.roll(portraits[1], -18, axis=1)).save(edge)
    concept = method.concept_from_files(
        base, [ref], tmp_path / "c5", class_noun="person", adapter=adapter, pose_image=str(edge)
    )
    with apply_concepts(base, [concept]) as applied:
        # (the condition is drawn at the latents' size times the ControlNet's 8: 64x128 on the tiny base, whose VAE
        # halves the picture once; the picture asked on a real base)
        with pytest.raises(LimnerError, match=r"edge\.png \(64x64 px\) does not fit a 64x128 picture"):
            draw(base, conditioning=applied.condition("a person", 2), height=32, width=16)


def test_an_official_checkpoint_for_another_base_is_refused_naming_what_differs(
    adapter, tiny_base, portraits, tmp_path
):
    method, base = get_method("instantid"), load_base(str(tiny_base), device="cpu")
    # the Image Adapter of an SDXL-sized base (cross-attention width 2048)
    other = tmp_path / "sdxl-sized"
    shutil.copytree(adapter, other)
    state = load_file(str(adapter / WEIGHTS))
    projection = id_projection(128, 2048, 64, 16)
    proj = {f"image_proj.{k}": v for k, v in projection_state_dict(projection).items()}
    save_file({**state, **proj}, str(other / WEIGHTS))
    (other / "adapter.json").unlink()  # as an official download: no limner manifest
    with pytest.raises(LimnerError, match="another base.*cross-attention width 32 expected, 2048 found"):
        method.personalize(base, subject(portraits[:1]), tmp_path / "x1", adapter=other)
    # an IdentityNet made from another UNet (the world base's)
    world = load_base(None)
    mixed = tmp_path / "mixed"
    shutil.copytree(adapter, mixed)
    (mixed / "adapter.json").unlink()
    shutil.rmtree(mixed / CONTROLNET)
    controlnet_from_unet(world.pipe.unet).save_pretrained(mixed / CONTROLNET)
    with pytest.raises(LimnerError, match=r"ControlNet .*ControlNetModel was made for another base: .*block_out"):
        method.personalize(base, subject(portraits[:1]), tmp_path / "x2", adapter=mixed)


def test_generate_cli_draws_with_a_pose_image_and_names_a_reference_without_a_face(
    adapter, tiny_base, portraits, tmp_path
):
    ref, pose, blank = tmp_path / "ref.png", tmp_path / "pose.png", tmp_path / "blank.png"
    Image.fromarray(portraits[0]).save(ref)
    Image.fromarray(portraits[3]).save(pose)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(blank)
    common = ["--method", "instantid", "--adapter", str(adapter), "--base", str(tiny_base), "-n", "1", "--steps", "2"]
    runner = CliRunner()
    r = runner.invoke(
        app, ["generate", "a portrait of a person", "--image", str(ref), "--pose-image", str(pose), "--out",
              str(tmp_path / "out"), *common],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "out").glob("*-00.png"))) == 1
    r = runner.invoke(app, ["generate", "a person", "--image", str(blank), "--out", str(tmp_path / "o2"), *common])
    assert r.exit_code == 2 and "blank.png: no face found" in r.output
    r = runner.invoke(app, ["generate", "a person", "--pose-image", str(pose), "--out", str(tmp_path / "o3")])
    assert r.exit_code == 2 and "--pose-image" in r.output


def test_generate_cli_sets_the_identitynet_scale(adapter, tiny_base, portraits, tmp_path):
    """--controlnet-scale: 0 draws the Image Adapter alone (another picture than the default 0.8), the default
    written out draws the default's picture, and it is refused where nothing steers with a ControlNet."""
    ref = tmp_path / "ref.png"
    Image.fromarray(portraits[0]).save(ref)
    common = ["--image", str(ref), "--method", "instantid", "--adapter", str(adapter), "--base", str(tiny_base),
              "-n", "1", "--steps", "2"]  # fmt: skip
    runner = CliRunner()

    def drawn(*extra: str) -> np.ndarray:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        r = runner.invoke(app, ["generate", "a portrait of a person", *common, "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        return np.asarray(Image.open(next(out.glob("*-00.png"))))

    default = drawn()
    assert np.array_equal(drawn("--controlnet-scale", "0.8"), default)
    assert not np.array_equal(drawn("--controlnet-scale", "0"), default)
    r = runner.invoke(app, ["generate", "a person", "--base", str(tiny_base), "--controlnet-scale", "0.5", "-n", "1",
                            "--steps", "1", "--out", str(tmp_path / "none")])  # fmt: skip
    assert r.exit_code == 2 and "--controlnet-scale" in r.output and "instantid" in r.output
    r = runner.invoke(app, ["generate", "a person", *common, "--controlnet-scale", "-1", "--out", str(tmp_path / "n")])
    assert r.exit_code == 2 and "--controlnet-scale -1" in r.output


def test_a_controlnet_runs_in_an_sdxl_generation_too(tiny_sdxl):
    """The same hook on SDXL's UNet: the ControlNet gets the pooled text and time ids it conditions on."""
    base = load_base(str(tiny_sdxl), device="cpu")
    unet = base.pipe.unet
    bare = draw(base, "a person")
    net = controlnet_from_unet(unet)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    remove = install_controlnet(unet, ControlSignal(net, torch.rand(1, 3, 64, 64), scale=1.0))
    try:
        steered = draw(base, "a person")
    finally:
        remove()
    assert not np.array_equal(bare, steered) and np.array_equal(bare, draw(base, "a person"))


def test_the_shipped_world_adapter_is_the_official_layout_in_fp16_and_records_its_run():
    """The world adapter limner ships: the Image Adapter in fp16 in the official layout, the IdentityNet stored as
    a delta against the world UNet (fp16, 10.4 of the full 16.2 MB; tests/test_controlnet_delta.py) that limner
    materialises, and adapter.json records what `limner pretrain --from` runs again."""
    import json

    from safetensors import safe_open

    from limner.adapters.controlnet import DELTA_WEIGHTS, load_controlnet
    from limner.models.loading import ASSETS

    folder = ASSETS / "world" / "adapters" / "instantid"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 14 * 2**20 and not any("checkpoints" in p.parts for p in files)
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
        assert {k.split(".")[0] for k in f.keys()} == {"image_proj", "ip_adapter"}
    with safe_open(str(folder / CONTROLNET / DELTA_WEIGHTS), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    world = load_base(device="cpu")
    net = load_controlnet(folder / CONTROLNET, world.pipe.unet)
    assert net.config.block_out_channels == world.pipe.unet.config.block_out_channels
    manifest = json.loads((folder / "adapter.json").read_text())
    assert manifest["method"] == "instantid" and manifest["base_fingerprint"] == world.fingerprint
    assert manifest["data"]["kind"] == "world" and manifest["data"]["subjects"] == "characters"
    assert get_method("instantid").default_adapter(world) == folder


def test_a_pickled_controlnet_folder_loads_only_with_allow_pickle(tiny_base, tmp_path):
    """diffusers falls back to diffusion_pytorch_model.bin silently; limner reads that pickle only when the command
    was given --allow-pickle."""
    from limner.adapters.controlnet import load_controlnet, save_controlnet
    from limner.io import pickles_allowed

    unet = load_base(str(tiny_base), device="cpu").pipe.unet
    folder = tmp_path / "ControlNetModel"
    save_controlnet(controlnet_from_unet(unet), folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), folder / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(LimnerError, match="pickle.*--allow-pickle"):
        load_controlnet(folder, unet)
    with pickles_allowed(True):
        assert load_controlnet(folder, unet) is not None


def test_an_official_adapter_reads_the_raw_face_embedding_and_limners_the_norm_it_recorded(
    adapter, tiny_base, portraits, tmp_path, monkeypatch
):
    """Official InstantID feeds insightface's raw `embedding` (norm ~20-30, the recogniser's own), and limner's
    adapters the unit embedding at the norm their manifest records: with an analyser that knows the raw norm, the
    official file's concept holds the raw embedding, limner's the same as before."""
    import dataclasses

    import limner.encoders.faces as faces
    from limner.encoders.faces import WorldFaceAnalysis

    state = load_file(str(adapter / WEIGHTS))
    official = tmp_path / "InstantID"
    official.mkdir()
    save_file(state, str(official / "ip-adapter.safetensors"))
    shutil.copytree(adapter / CONTROLNET, official / CONTROLNET)
    method, base = get_method("instantid"), load_base(str(tiny_base), device="cpu")

    def embedding(folder, out) -> torch.Tensor:
        concept = method.personalize(base, subject(portraits[:2]), tmp_path / out, adapter=folder)
        return load_file(str(concept / EMBEDS))["image_embeds"].flatten()

    units = torch.stack([fs[0].embedding for fs in WorldFaceAnalysis().analyse(portraits[:2])])
    ours_before, width = embedding(adapter, "ours-before"), face_analysis(None).embedding_dim
    # the world's analyser gives no raw norm: sqrt(width), about a 512-d ArcFace's
    assert torch.allclose(embedding(official, "official-before"), float(width) ** 0.5 * units.mean(0), atol=1e-5)

    class KnowsRawNorm(WorldFaceAnalysis):
        def analyse(self, images):
            return [[dataclasses.replace(f, raw_norm=7.0) for f in fs] for fs in super().analyse(images)]

    monkeypatch.setattr(faces, "face_analysis", lambda folder, device="cpu": KnowsRawNorm())
    assert torch.allclose(embedding(official, "official"), 7.0 * units.mean(0), atol=1e-5)
    assert torch.equal(embedding(adapter, "ours"), ours_before)


def test_an_identitynet_outside_the_adapter_is_fingerprinted_with_the_concept(adapter, tiny_base, portraits, tmp_path):
    """`--set controlnet=DIR`: the concept records the IdentityNet it was encoded with; drawing with it after that
    folder changed is an error, and eval's cache keys the two folders apart."""
    external = tmp_path / "identitynet"
    shutil.copytree(adapter / CONTROLNET, external)
    method, base = get_method("instantid"), load_base(str(tiny_base), device="cpu")
    concept = method.personalize(
        base, subject(portraits[:1]), tmp_path / "c", adapter=adapter, controlnet=str(external)
    )
    with apply_concepts(base, [concept]) as applied:
        draw(base, conditioning=applied.condition("a portrait of a person", 2))
    before = method.key_inputs({"adapter": adapter, "controlnet": str(external)})
    (weights,) = external.glob("*.safetensors")
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = state[name] + 1
    save_file(state, str(weights))
    with pytest.raises(LimnerError, match="IdentityNet .* changed since concept"):
        apply_concepts(base, [concept])
    assert method.key_inputs({"adapter": adapter, "controlnet": str(external)}) != before
    assert method.key_inputs({"adapter": adapter}) == {k: v for k, v in before.items() if k != "identitynet"}
