"""PhotoMaker: the stacked ID embedding at the class word, the official checkpoint layout on an SDXL-shaped base,
identity mixing, and the references a user can get wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from limner.cli import app
from limner.conditioning import apply_concepts
from limner.errors import LimnerError
from limner.evaluation.subjects import world_subjects
from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.methods.photomaker import EMBEDS, WEIGHTS, stack_shares
from limner.methods.photomaker.prompts import merge_step_count, stacked_token_ids
from limner.methods.photomaker.weights import lora_from_peft, lora_to_peft, read_weights
from limner.models.loading import load_base

PROMPT = "a portrait of a woman img on the beach"


@pytest.fixture(scope="module")
def world():
    return load_base(None, device="cpu")


@pytest.fixture(scope="module")
def adapter(world, tmp_path_factory):
    """A PhotoMaker adapter for the world base from 2 steps of pretraining on its identity stream."""
    out = tmp_path_factory.mktemp("photomaker") / "adapter"
    return get_method("photomaker").pretrain(world, "world", out, max_steps=2, batch_size=2, checkpoint_every=0)


def person(name: str, n: int = 4) -> Subject:
    (s,) = world_subjects(f"world:{name}")
    return Subject(name, s.class_noun, list(s.images[:n]))


# ---- prompts -------------------------------------------------------------------------------------------------------


def test_the_class_token_is_stacked_once_per_image_and_the_trigger_removed(world):
    tok = world.pipe.tokenizer
    ids, positions = stacked_token_ids(tok, PROMPT, 3)
    clean = tok("a portrait of a woman on the beach", padding="max_length", max_length=tok.model_max_length).input_ids
    woman = tok("woman", add_special_tokens=False).input_ids[-1]
    assert positions == [5, 6, 7] and [ids[p] for p in positions] == [woman] * 3
    assert [t for i, t in enumerate(ids) if i not in positions[1:]] == clean[:-2]  # the clean prompt's, padded
    for bad in ("a portrait of a woman on the beach", "a woman img and a man img", "img a woman"):
        with pytest.raises(LimnerError, match="img"):
            stacked_token_ids(tok, bad, 1)


def test_start_merge_step_is_the_official_i_le_int_ratio_times_steps():
    assert merge_step_count(50, 0.2) == 11  # i = 0..10 text only
    assert merge_step_count(25, 0.2) == 6
    assert merge_step_count(4, 0.9) == 3  # the identity always draws the last step


def test_identity_mixing_shares_the_stack_by_weight():
    assert stack_shares([4, 4], [1, 1]) == [4, 4]
    assert stack_shares([4, 4], [3, 1]) == [6, 2]
    assert stack_shares([1, 3], [1, 1]) == [2, 2]
    assert stack_shares([2, 2], [100, 1]) == [3, 1]  # each person keeps one copy
    assert stack_shares([1, 1, 1], [100, 1, 1]) == [1, 1, 1], "never more rows than references"
    assert stack_shares([3], [0.5]) == [3]


# ---- the world: pretrain, encode, generate -------------------------------------------------------------------------


def test_pretraining_writes_the_official_layout_in_fp16(adapter):
    flat = load_file(str(adapter / WEIGHTS))
    assert all(v.dtype == torch.float16 for v in flat.values())
    assert {k.split(".")[0] for k in flat} == {"id_encoder", "lora_weights"}
    lora = [k for k in flat if k.startswith("lora_weights.")]
    assert lora and all(".processor.to_" in k and k.endswith(("_lora.down.weight", "_lora.up.weight")) for k in lora)
    assert any(".attn1.processor.to_out_lora.up.weight" in k for k in lora)  # self- and cross-attention alike
    for key in ("vision_model.post_layernorm.weight", "visual_projection.weight", "fuse_module.mlp1.fc1.weight"):
        assert f"id_encoder.{key}" in flat
    manifest = json.loads((adapter / "adapter.json").read_text())
    assert manifest["variant"] == "v1" and manifest["data"]["subjects"] == "characters"
    peft, rank = lora_to_peft(read_weights(adapter)["lora_weights"], adapter)
    assert rank == manifest["lora"]["rank"] and lora_from_peft(peft).keys() == {k[13:] for k in lora}


def test_each_reference_is_one_stacked_token_fused_at_the_class_word(world, adapter, tmp_path):
    method = get_method("photomaker")
    concept = method.personalize(world, person("ada"), tmp_path / "ada", adapter=adapter)
    embeds = load_file(str(concept / EMBEDS))["id_embeds"]
    assert embeds.shape == (4, 256) and len(list((concept / "references").glob("*.png"))) == 4
    one = method.personalize(world, person("ada"), tmp_path / "ada1", adapter=adapter, num_references=1)
    assert torch.allclose(load_file(str(one / EMBEDS))["id_embeds"], embeds[:1], atol=1e-5)
    with apply_concepts(world, [concept]) as applied:
        conditioning = applied.condition(PROMPT, 10)
        fused = conditioning.pipe_kwargs["prompt_embeds"][0]
    assert conditioning.layout_prompt == "a portrait of a woman on the beach" and conditioning.layout_steps == 3
    ids, positions = stacked_token_ids(world.pipe.tokenizer, PROMPT, 4)
    with torch.no_grad():
        text = world.pipe.text_encoder(torch.tensor([ids]))[0][0]
    changed = (fused - text).abs().amax(-1) > 1e-4
    assert changed.nonzero().flatten().tolist() == positions  # the four copies of "woman", nothing else
    assert not torch.allclose(fused[positions[0]], fused[positions[1]])  # each copy its own picture


def test_two_people_mix_by_their_weights(world, adapter, tmp_path):
    method = get_method("photomaker")
    ada = method.personalize(world, person("ada", 2), tmp_path / "ada", adapter=adapter, weight=3.0)
    eve = method.personalize(world, person("eve", 2), tmp_path / "eve", adapter=adapter)
    a, e = (load_file(str(c / EMBEDS))["id_embeds"] for c in (ada, eve))
    draws = {}
    with apply_concepts(world, [ada, eve]) as applied:
        installed = applied.groups[0][0]  # the instance that holds the installed fuse module
        mixed = installed.condition(world, [ada, eve], PROMPT)["prompt_embeds"]
        by_hand = installed.fused_prompt(world, PROMPT, torch.cat([a, a[:1], e[:1]]), "img")["prompt_embeds"]
        assert torch.equal(mixed, by_hand)  # 3:1 over 2 + 2 photos: three of ada's, one of eve's
        draws["3:1"] = np.asarray(
            generate(
                world, GenerationSettings(PROMPT, num_images=1, steps=4), conditioning=applied.condition(PROMPT, 4)
            ).images[0]
        )
    eve_heavy = method.personalize(world, person("eve", 2), tmp_path / "eve3", adapter=adapter, weight=3.0)
    with apply_concepts(world, [ada, eve_heavy]) as applied:
        draws["1:1"] = np.asarray(
            generate(
                world, GenerationSettings(PROMPT, num_images=1, steps=4), conditioning=applied.condition(PROMPT, 4)
            ).images[0]
        )
    assert not np.array_equal(draws["3:1"], draws["1:1"])


# ---- what a user can get wrong -------------------------------------------------------------------------------------


def write(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def test_a_reference_without_a_face_is_an_error_naming_it(world, adapter, tmp_path):
    grey = write(tmp_path / "wall.png", np.full((64, 64, 3), 128))
    runner = CliRunner()
    args = ["generate", PROMPT, "--method", "photomaker", "--image", str(grey), "--adapter", str(adapter)]
    r = runner.invoke(app, [*args, "-n", "1", "--steps", "2", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "wall.png" in r.output and "no face" in r.output, r.output


def test_several_faces_take_the_largest_and_say_so(world, adapter, tmp_path):
    from limner.world.faces import two_character_renders

    two = two_character_renders(seed=0, n=1)[0][0]  # two held-out people side by side
    method = get_method("photomaker")
    with pytest.warns(UserWarning, match=r"two.png: 2 faces found; took the largest \(box [0-9]+,"):
        concept = method.concept_from_files(
            world, [write(tmp_path / "two.png", two)], tmp_path / "c", class_noun="woman", adapter=adapter
        )
    assert "took the largest" in json.loads((concept / "limner.json").read_text())["notes"][0]


def test_more_references_than_the_variant_stacks(world, adapter, tmp_path):
    method, ada = get_method("photomaker"), person("ada", 5)
    files = [write(tmp_path / f"{i}.png", im) for i, im in enumerate(ada.images)]
    with pytest.raises(LimnerError, match="5 references given.*at most 4"):  # photos named one by one
        method.concept_from_files(world, files, tmp_path / "c", class_noun="woman", adapter=adapter)
    with pytest.raises(LimnerError, match="num_references=5.*at most 4"):
        method.personalize(world, ada, tmp_path / "c", adapter=adapter, num_references=5)
    with pytest.warns(UserWarning, match="has 5 references.*took the first 4"):  # a folder, the bench's five
        concept = method.personalize(world, ada, tmp_path / "c", adapter=adapter)
    assert load_file(str(concept / EMBEDS))["id_embeds"].shape[0] == 4


def test_a_prompt_without_the_trigger_is_refused_when_photos_are_given(world, adapter, tmp_path):
    path = write(tmp_path / "ada.png", person("ada", 1).images[0])
    r = CliRunner().invoke(
        app,
        [
            "generate",
            "a portrait of a woman",
            "--method",
            "photomaker",
            "--image",
            str(path),
            "--adapter",
            str(adapter),
            "-n",
            "1",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 2 and "no trigger word 'img'" in r.output, r.output


# ---- the official checkpoint on an SDXL-shaped base ----------------------------------------------------------------


def official_checkpoint(unet, hidden=64, widths=(32, 32), rank=4, seed=0) -> dict:
    """{"id_encoder", "lora_weights"} with the official keys (TencentARC/PhotoMaker's PhotoMakerIDEncoder and its
    diffusers attention-processor LoRA), random values, for a tiny CLIP tower and this UNet."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    d, layers, inner, patch, image = sum(widths), 2, 2 * hidden, 8, 32
    enc = {
        "vision_model.embeddings.class_embedding": rand(hidden),
        "vision_model.embeddings.patch_embedding.weight": rand(hidden, 3, patch, patch),
        "vision_model.embeddings.position_embedding.weight": rand((image // patch) ** 2 + 1, hidden),
        "vision_model.embeddings.position_ids": torch.arange((image // patch) ** 2 + 1)[None],  # older transformers
        "visual_projection.weight": rand(widths[0], hidden),
    }
    if len(widths) == 2:  # one projection per text encoder: SDXL's two, the world's one
        enc["visual_projection_2.weight"] = rand(widths[1], hidden)
    for norm in ("pre_layrnorm", "post_layernorm"):
        enc |= {f"vision_model.{norm}.weight": torch.ones(hidden), f"vision_model.{norm}.bias": rand(hidden)}
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            enc |= {f"{p}self_attn.{proj}.weight": rand(hidden, hidden), f"{p}self_attn.{proj}.bias": rand(hidden)}
        for ln in ("layer_norm1", "layer_norm2"):
            enc |= {f"{p}{ln}.weight": torch.ones(hidden), f"{p}{ln}.bias": rand(hidden)}
        enc |= {f"{p}mlp.fc1.weight": rand(inner, hidden), f"{p}mlp.fc1.bias": rand(inner)}
        enc |= {f"{p}mlp.fc2.weight": rand(hidden, inner), f"{p}mlp.fc2.bias": rand(hidden)}
    for mlp, width in (("mlp1", 2 * d), ("mlp2", d)):
        enc |= {
            f"fuse_module.{mlp}.layernorm.weight": torch.ones(width),
            f"fuse_module.{mlp}.layernorm.bias": rand(width),
        }
        enc |= {f"fuse_module.{mlp}.fc1.weight": rand(d, width), f"fuse_module.{mlp}.fc1.bias": rand(d)}
        enc |= {f"fuse_module.{mlp}.fc2.weight": rand(d, d), f"fuse_module.{mlp}.fc2.bias": rand(d)}
    enc |= {"fuse_module.layer_norm.weight": torch.ones(d), "fuse_module.layer_norm.bias": rand(d)}
    lora = {}
    for name, module in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            for proj, layer in (
                ("to_q", module.to_q),
                ("to_k", module.to_k),
                ("to_v", module.to_v),
                ("to_out", module.to_out[0]),
            ):
                lora[f"unet.{name}.processor.{proj}_lora.down.weight"] = rand(rank, layer.in_features)
                lora[f"unet.{name}.processor.{proj}_lora.up.weight"] = rand(layer.out_features, rank) * 20
    return {"id_encoder": enc, "lora_weights": lora}


def save_official(official: dict, stem: Path) -> None:
    """The checkpoint as the official pickled `STEM.bin` and as its safetensors conversion `STEM.safetensors`
    ({"id_encoder": ..., "lora_weights": ...} flattened to `id_encoder.*` / `lora_weights.*`)."""
    torch.save(official, stem.with_suffix(".bin"))
    flat = {f"{part}.{k}": v for part, state in official.items() for k, v in state.items()}
    save_file(flat, str(stem.with_suffix(".safetensors")))


def encoded_from_both(base, stem: Path, tmp_path: Path) -> tuple[Path, Path]:
    """ada's concept from `STEM.bin` (refused without allow_pickle, read with it) and from `STEM.safetensors`."""
    method, ada = get_method("photomaker"), person("ada", 2)
    with pytest.raises(LimnerError, match="pickle"):
        method.personalize(base, ada, tmp_path / "refused", adapter=stem.with_suffix(".bin"))
    pickled = method.personalize(base, ada, tmp_path / "c", adapter=stem.with_suffix(".bin"), allow_pickle=True)
    return pickled, method.personalize(base, ada, tmp_path / "c2", adapter=stem.with_suffix(".safetensors"))


def test_the_official_checkpoint_runs_on_an_sdxl_folder(tiny_sdxl, world, tmp_path):
    base = load_base(str(tiny_sdxl), device="cpu")
    official = official_checkpoint(base.pipe.unet)
    save_official(official, tmp_path / "photomaker-v1")
    concept, from_safetensors = encoded_from_both(base, tmp_path / "photomaker-v1", tmp_path)
    embeds = load_file(str(concept / EMBEDS))["id_embeds"]
    assert embeds.shape == (2, 64) and torch.equal(embeds, load_file(str(from_safetensors / EMBEDS))["id_embeds"])

    plain = generate(base, GenerationSettings(PROMPT.replace(" img", ""), num_images=1, steps=3)).images[0]
    with apply_concepts(base, [from_safetensors]) as applied:
        conditioning = applied.condition(PROMPT, 3)
        assert conditioning.pipe_kwargs["prompt_embeds"].shape[-1] == 64  # 32 + 32, both encoders' states
        assert "pooled_prompt_embeds" in conditioning.pipe_kwargs
        key = next(k for k in official["lora_weights"] if ".attn2.processor.to_k_lora.down" in k)
        module = dict(base.pipe.unet.named_modules())[key[5:].split(".processor")[0] + ".to_k"]
        assert torch.equal(module.lora_A["photomaker"].weight, official["lora_weights"][key])  # mapped by key
        drawn = generate(base, GenerationSettings(PROMPT, num_images=1, steps=3), conditioning=conditioning).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(drawn))
    after = generate(base, GenerationSettings(PROMPT.replace(" img", ""), num_images=1, steps=3)).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(after))  # uninstalled: the base as it was


def test_official_checkpoints_that_do_not_fit_are_refused(tiny_sdxl, world, tmp_path):
    base = load_base(str(tiny_sdxl), device="cpu")
    official = official_checkpoint(base.pipe.unet)
    method, ada = get_method("photomaker"), person("ada", 1)
    torch.save({"id_encoder": official["id_encoder"]}, tmp_path / "no-lora.bin")
    with pytest.raises(LimnerError, match="no-lora.bin has no lora_weights"):
        method.personalize(base, ada, tmp_path / "c", adapter=tmp_path / "no-lora.bin", allow_pickle=True)
    torch.save(official, tmp_path / "sdxl.bin")
    with pytest.raises(LimnerError, match="fuses into 64-wide text embeddings, this base's are 256.*another base"):
        method.personalize(world, ada, tmp_path / "c", adapter=tmp_path / "sdxl.bin", allow_pickle=True)
    r = CliRunner().invoke(
        app,
        [
            "generate",
            PROMPT,
            "--method",
            "photomaker",
            "--image",
            str(write(tmp_path / "ada.png", ada.images[0])),
            "--adapter",
            str(tmp_path / "sdxl.bin"),
            "--allow-pickle",
            "-n",
            "1",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 2 and "another base" in r.output, r.output


def test_the_shipped_world_adapter_is_within_budget_and_in_the_official_layout(world):
    """src/limner/assets/world/adapters/photomaker: at most 9 MB of fp16 weights under the official prefixes, and
    the adapter.json `limner pretrain --from` reruns (the world's identity stream, clothes redrawn per view)."""
    from limner.models.loading import ASSETS

    folder = ASSETS / "world" / "adapters" / "photomaker"
    assert (folder / WEIGHTS).stat().st_size <= 9_000_000 and not (folder / "checkpoints").exists()
    flat = load_file(str(folder / WEIGHTS))
    assert {k.split(".")[0] for k in flat} == {"id_encoder", "lora_weights"}
    assert all(v.dtype == torch.float16 for v in flat.values())
    manifest = json.loads((folder / "adapter.json").read_text())
    assert manifest["base_fingerprint"] == world.fingerprint and manifest["variant"] == "v1"
    assert manifest["data"] | {"subjects": "characters", "pair": "view", "clothes": "vary"} == manifest["data"]
    assert get_method("photomaker").adapter_for(world, None) == folder  # the world's default


# ---- v2: the face embedding through a perceiver, 2 tokens an image -------------------------------------------------


def official_v2_checkpoint(unet, face_width: int, widths=(256,), hidden=64, depth=4, seed=1) -> dict:
    """photomaker-v2.bin's layout (TencentARC/PhotoMaker's PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken): v1's
    keys and `qformer_perceiver.*`, shaped for this base (official: face 512, fused 2048, tower 1024; 128-wide
    heads, so to_q is fused x fused), random values."""
    official = official_checkpoint(unet, hidden=hidden, widths=widths, seed=seed)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    d, f, q = sum(widths), face_width, "qformer_perceiver."
    enc = {
        f"{q}token_proj.0.weight": rand(4 * f, f),
        f"{q}token_proj.0.bias": rand(4 * f),
        f"{q}token_proj.2.weight": rand(2 * d, 4 * f),
        f"{q}token_proj.2.bias": rand(2 * d),
        f"{q}token_norm.weight": torch.ones(d),
        f"{q}token_norm.bias": rand(d),
    }
    r = f"{q}perceiver_resampler."
    enc |= {f"{r}proj_in.weight": rand(d, hidden), f"{r}proj_in.bias": rand(d)}
    enc |= {f"{r}proj_out.weight": rand(d, d), f"{r}proj_out.bias": rand(d)}
    enc |= {f"{r}norm_out.weight": torch.ones(d), f"{r}norm_out.bias": rand(d)}
    for i in range(depth):
        a, ff = f"{r}layers.{i}.0.", f"{r}layers.{i}.1."
        for norm in ("norm1", "norm2"):
            enc |= {f"{a}{norm}.weight": torch.ones(d), f"{a}{norm}.bias": rand(d)}
        enc |= {f"{a}to_q.weight": rand(d, d), f"{a}to_kv.weight": rand(2 * d, d), f"{a}to_out.weight": rand(d, d)}
        enc |= {f"{ff}0.weight": torch.ones(d), f"{ff}0.bias": rand(d)}
        enc |= {f"{ff}1.weight": rand(4 * d, d), f"{ff}3.weight": rand(d, 4 * d)}
    official["id_encoder"] |= enc
    return official


@pytest.fixture(scope="module")
def official_v2(world, tmp_path_factory):
    """The official v2 layout for the world base, pickled and as its safetensors conversion."""
    from limner.encoders.faces import WorldFaceAnalysis

    folder = tmp_path_factory.mktemp("photomaker-v2")
    official = official_v2_checkpoint(world.pipe.unet, WorldFaceAnalysis().embedding_dim)
    save_official(official, folder / "photomaker-v2")
    return folder, official


def test_the_official_v2_checkpoint_runs_on_the_world_two_tokens_an_image(world, official_v2, tmp_path):
    folder, official = official_v2
    pickled, concept = encoded_from_both(world, folder / "photomaker-v2", tmp_path)
    embeds = load_file(str(concept / EMBEDS))["id_embeds"]
    assert embeds.shape == (2, 2, 256) and torch.equal(embeds, load_file(str(pickled / EMBEDS))["id_embeds"])
    assert not torch.allclose(embeds[0, 0], embeds[0, 1])  # two tokens, each its own
    assert json.loads((concept / "limner.json").read_text())["variant"] == "v2"

    plain = generate(world, GenerationSettings(PROMPT.replace(" img", ""), num_images=1, steps=3)).images[0]
    with apply_concepts(world, [concept]) as applied:
        conditioning = applied.condition(PROMPT, 3)
        fused = conditioning.pipe_kwargs["prompt_embeds"][0]
        drawn = generate(world, GenerationSettings(PROMPT, num_images=1, steps=3), conditioning=conditioning).images[0]
    ids, positions = stacked_token_ids(world.pipe.tokenizer, PROMPT, 4)
    with torch.no_grad():
        text = world.pipe.text_encoder(torch.tensor([ids]))[0][0]
    changed = (fused - text).abs().amax(-1) > 1e-4
    assert changed.nonzero().flatten().tolist() == positions  # "woman" 2 images x 2 tokens, nothing else
    assert not np.array_equal(np.asarray(plain), np.asarray(drawn))


def test_v2_reads_each_reference_face_embedding_from_the_face_analysis(world, official_v2, tmp_path, monkeypatch):
    """At encode time the identity embedding is the analyser's (the world's, or --faces DIR's), never ground truth:
    an analyser that hands out another embedding for the same faces changes v2's tokens, and not v1's."""
    import dataclasses

    import limner.encoders.faces as faces
    from limner.encoders.faces import WorldFaceAnalysis

    folder, _ = official_v2
    calls = []

    class Flipped(WorldFaceAnalysis):
        def analyse(self, images):
            calls.append(len(images))
            found = super().analyse(images)
            return [[dataclasses.replace(f, embedding=-f.embedding) for f in fs] for fs in found]

    method, ada = get_method("photomaker"), person("ada", 2)
    adapter = folder / "photomaker-v2.safetensors"
    normal = load_file(str(method.personalize(world, ada, tmp_path / "a", adapter=adapter) / EMBEDS))["id_embeds"]
    monkeypatch.setattr(faces, "face_analysis", lambda folder, device="cpu": Flipped())
    flipped = load_file(str(method.personalize(world, ada, tmp_path / "b", adapter=adapter) / EMBEDS))["id_embeds"]
    assert calls == [2] and not torch.allclose(normal, flipped, atol=1e-3)


def test_the_official_v2_file_reads_the_raw_face_embedding_as_its_scripts_feed_it(
    world, official_v2, tmp_path, monkeypatch
):
    """photomaker-v2.bin was trained on insightface's raw `embedding` (the official scripts feed faces[0]['embedding'],
    norm ~20-30): the recogniser's own norm where the analyser gives it, sqrt(width) where it does not."""
    import dataclasses

    import limner.encoders.faces as faces
    from limner.encoders.faces import WorldFaceAnalysis

    folder, _ = official_v2
    method, ada = get_method("photomaker"), person("ada", 2)

    def embeds(norm: float | None, out: str) -> torch.Tensor:
        class WithNorm(WorldFaceAnalysis):
            def analyse(self, images):
                return [[dataclasses.replace(f, raw_norm=norm) for f in fs] for fs in super().analyse(images)]

        monkeypatch.setattr(faces, "face_analysis", lambda folder, device="cpu": WithNorm())
        concept = method.personalize(world, ada, tmp_path / out, adapter=folder / "photomaker-v2.safetensors")
        return load_file(str(concept / EMBEDS))["id_embeds"]

    width = WorldFaceAnalysis().embedding_dim
    unknown, same, other = embeds(None, "a"), embeds(float(width) ** 0.5, "b"), embeds(3.0, "c")
    assert torch.allclose(unknown, same, atol=1e-5) and not torch.allclose(unknown, other, atol=1e-3)


def test_v2_files_that_do_not_fit_are_refused(world, official_v2, tmp_path):
    folder, official = official_v2
    method, ada = get_method("photomaker"), person("ada", 1)
    v2 = folder / "photomaker-v2.safetensors"
    with pytest.raises(LimnerError, match="variant=v1, but .*photomaker-v2.safetensors is a PhotoMaker v2"):
        method.personalize(world, ada, tmp_path / "c", adapter=v2, variant="v1")
    with pytest.raises(LimnerError, match="variant 'v3'"):
        method.personalize(world, ada, tmp_path / "c", adapter=v2, variant="v3")
    cut = {k: v for k, v in official["id_encoder"].items() if ".layers.3." not in k}  # a perceiver layer short
    torch.save({"id_encoder": cut, "lora_weights": official["lora_weights"]}, tmp_path / "cut.bin")
    with pytest.raises(LimnerError, match="cut.bin: its id_encoder misses .*qformer_perceiver"):
        method.personalize(world, ada, tmp_path / "c", adapter=tmp_path / "cut.bin", allow_pickle=True)
    arcface = official_v2_checkpoint(world.pipe.unet, 512)  # made for insightface's 512-d ArcFace embedding
    torch.save(arcface, tmp_path / "arcface.bin")
    with pytest.raises(LimnerError, match="reads 512-wide face embeddings; the face analysis gives 128-wide"):
        method.personalize(world, ada, tmp_path / "c", adapter=tmp_path / "arcface.bin", allow_pickle=True)
    sdxl = official_v2_checkpoint(world.pipe.unet, 128, widths=(1024, 1024))
    torch.save(sdxl, tmp_path / "sdxl.bin")
    with pytest.raises(LimnerError, match="fuses into 2048-wide text embeddings, this base's are 256.*another base"):
        method.personalize(world, ada, tmp_path / "c", adapter=tmp_path / "sdxl.bin", allow_pickle=True)


def test_v2_pretrains_its_perceiver_and_writes_the_official_v2_layout(world, tmp_path):
    method = get_method("photomaker")
    out = method.pretrain(world, "world", tmp_path / "v2", max_steps=2, batch_size=2, checkpoint_every=0, variant="v2")
    flat = load_file(str(out / WEIGHTS))
    assert "id_encoder.qformer_perceiver.perceiver_resampler.layers.3.0.to_kv.weight" in flat
    assert flat["id_encoder.qformer_perceiver.token_proj.0.weight"].shape == (4 * 128, 128)  # the world's faces
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["variant"] == "v2" and "qformer_perceiver." in manifest["trained"]
    concept = method.personalize(world, person("eve", 1), tmp_path / "eve", adapter=out)
    assert load_file(str(concept / EMBEDS))["id_embeds"].shape == (1, 2, 256)


def test_v2_identity_mixing_shares_whole_images_of_two_tokens(world, official_v2, tmp_path):
    """Weight 2:1 over one photo each: each person keeps their image's two tokens (shared by tokens, ada would
    take 3 of 4 copies, one of them half an image)."""
    folder, _ = official_v2
    method, adapter = get_method("photomaker"), folder / "photomaker-v2.safetensors"
    ada = method.personalize(world, person("ada", 1), tmp_path / "ada", adapter=adapter, weight=2.0)
    eve = method.personalize(world, person("eve", 1), tmp_path / "eve", adapter=adapter)
    a, e = (load_file(str(c / EMBEDS))["id_embeds"] for c in (ada, eve))
    with apply_concepts(world, [ada, eve]) as applied:
        installed = applied.groups[0][0]
        mixed = installed.condition(world, [ada, eve], PROMPT)["prompt_embeds"]
        stack = torch.cat([a[0], e[0]])  # [4, d]: ada's two tokens, then eve's
        assert torch.equal(mixed, installed.fused_prompt(world, PROMPT, stack, "img")["prompt_embeds"])
