"""Custom Diffusion on a tiny random pipeline: training and its file formats, the closed-form merge and
its algebra, joint training of several concepts, and retrieval of regularisation images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import clipped_alone, record_first_step_gradients, subject, two_custom_diffusion_concepts
from safetensors.torch import load_file

from limner.errors import LimnerError
from limner.methods import Subject, get_method
from limner.models.loading import load_base
from limner.training import TrainConfig


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
    out = get_method("custom_diffusion").personalize(
        base,
        subject(),
        tmp_path / "c",
        prior_preservation=False,
        augment_variants=3,
        mode="crossattn_kv",
        train=TrainConfig(max_steps=3, batch_size=2, learning_rate=1e-2, checkpoint_every=0),
    )
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
    torch.save(
        {**state, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.x": torch.zeros(1)},
        tmp_path / "cd.bin",
    )
    with pytest.raises(LimnerError, match="allow-pickle"):
        read_weights(tmp_path / "cd.bin")
    assert set(read_weights(tmp_path / "cd.bin", allow_pickle=True)) == set(state)


def test_gradient_clipping_sees_the_projections_and_only_the_modifier_tokens_row(tiny_base, tmp_path, monkeypatch):
    """One norm clips the trained projections and the modifier token's row together, as diffusers' script
    clips them: the embedding matrix's other rows are zeroed before clipping and count for nothing."""
    raw, clipped = record_first_step_gradients(monkeypatch)
    base = load_base(str(tiny_base), device="cpu")
    vocab = len(base.pipe.text_encoder.get_input_embeddings().weight)
    get_method("custom_diffusion").personalize(
        base,
        subject(),
        tmp_path / "c",
        prior_preservation=False,
        augment=False,
        train=TrainConfig(max_steps=1, batch_size=2, learning_rate=1e-2, checkpoint_every=0, max_grad_norm=1e-3),
    )
    *projections, g = raw
    *projections_clipped, c = clipped
    assert g[:vocab].abs().sum() > 0, "the prompt's other words got gradients"
    expected = clipped_alone([*projections, g[vocab:]], 1e-3)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=0) for a, b in zip([*projections_clipped, c[vocab:]], expected))
    assert not c[:vocab].any(), "the other rows' gradients are zeroed"


def test_custom_diffusion_default_trains_all_of_attn2_in_diffusers_layout(tiny_base, tmp_path):
    base = load_base(str(tiny_base), device="cpu")
    out = get_method("custom_diffusion").personalize(
        base,
        subject(),
        tmp_path / "c",
        prior_preservation=False,
        augment_variants=1,
        train=TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2, checkpoint_every=0),
    )
    state = load_file(str(out / "pytorch_custom_diffusion_weights.safetensors"))
    layers = [n for n, _ in base.pipe.unet.named_modules() if n.endswith("attn2")]
    for name in layers:  # the keys diffusers' CustomDiffusionAttnProcessor has with train_q_out=True
        for key in (
            "to_q_custom_diffusion.weight",
            "to_k_custom_diffusion.weight",
            "to_v_custom_diffusion.weight",
            "to_out_custom_diffusion.0.weight",
            "to_out_custom_diffusion.0.bias",
        ):
            assert f"{name}.processor.{key}" in state
    assert "limner's variant; the paper trains K and V only" in (out / "README.md").read_text(), "the card says so"
    fresh = load_base(str(tiny_base), device="cpu")
    get_method("custom_diffusion").install(fresh, [out])
    for name in layers:
        attn = fresh.pipe.unet.get_submodule(name)
        assert torch.allclose(attn.to_q.weight, state[f"{name}.processor.to_q_custom_diffusion.weight"].float())
        assert torch.allclose(
            attn.to_out[0].weight, state[f"{name}.processor.to_out_custom_diffusion.0.weight"].float()
        )


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


def test_custom_diffusion_merge_of_two_concepts(tiny_base, tmp_path):
    from limner.methods.custom_diffusion import merge

    a, b = two_custom_diffusion_concepts(tiny_base, tmp_path)
    merged = merge(load_base(str(tiny_base), device="cpu"), [a, b], tmp_path / "m")
    fresh = load_base(str(tiny_base), device="cpu")
    get_method("custom_diffusion").install(fresh, [merged])
    assert {"<new1>", "<new2>"} <= set(fresh.pipe.tokenizer.get_vocab())
    with pytest.raises(LimnerError, match="share a modifier token"):
        merge(load_base(str(tiny_base), device="cpu"), [a, a], tmp_path / "m2")
    kv = get_method("custom_diffusion").personalize(
        load_base(str(tiny_base), device="cpu"),
        subject(),
        tmp_path / "kv",
        modifier_token="<new3>",
        mode="crossattn_kv",
        prior_preservation=False,
        augment=False,
        train=TrainConfig(max_steps=1, batch_size=2, checkpoint_every=0),
    )
    with pytest.raises(LimnerError, match=r"different modes.*\(crossattn\).*\(crossattn_kv\)"):
        merge(load_base(str(tiny_base), device="cpu"), [a, kv], tmp_path / "m3")


def test_merge_keeps_each_concept_on_every_row_of_its_prompts(tiny_base, tmp_path):
    """The merged K/V give what each concept's own K/V gave on the prompts it was trained on, on every
    row the UNet attends to (padding included), and the merged manifest keeps those prompts."""
    from limner.methods import custom_diffusion as cd
    from limner.training.conditioning import PromptEncoder

    a, b = two_custom_diffusion_concepts(tiny_base, tmp_path)
    merged = cd.read_weights(
        cd.merge(load_base(str(tiny_base), device="cpu"), [a, b], tmp_path / "m") / cd.WEIGHTS_FILE
    )
    base = load_base(str(tiny_base), device="cpu")
    W0 = cd.layer_weights(base.pipe.unet, "crossattn")
    manifests = cd.read_concepts(base, [a, b])
    cd.load_tokens(base, [a, b], manifests)
    encoder = PromptEncoder(base.pipe, base.resolution)
    for concept, manifest in zip((a, b), manifests):
        prompts, token_id = (
            manifest["training_prompts"],
            base.pipe.tokenizer.convert_tokens_to_ids(manifest["tokens"][0]),
        )
        feats = encoder.encode(encoder.tokenize(prompts))[0].float()
        ids = base.pipe.tokenizer(
            prompts, padding="max_length", max_length=feats.shape[1], return_tensors="pt"
        ).input_ids
        X = torch.cat(
            [f[int((i == token_id).nonzero()[0]) :] for f, i in zip(feats, ids)]
        )  # from the token to the last pad
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

    def merge(out, *extra):
        args = ["merge", str(a), str(b), "--out", str(tmp_path / out), "--base", str(tiny_base), "--device", "cpu"]
        return CliRunner().invoke(app, [*args, *extra])

    assert merge("generic").exit_code == 0 and merge("given", "--captions", str(tmp_path / "caps.txt")).exit_code == 0
    weights = [
        read_weights(tmp_path / out / "pytorch_custom_diffusion_weights.safetensors") for out in ("generic", "given")
    ]
    assert any(not torch.allclose(weights[0][k].float(), weights[1][k].float()) for k in weights[0])
    r = merge("bad", "--captions", str(tmp_path / "empty.txt"))
    assert r.exit_code != 0 and "empty.txt has no captions" in r.output and not (tmp_path / "bad").exists()


def test_merge_keeps_the_meaning_of_world_captions_or_generic_prompts():
    from types import SimpleNamespace

    from limner.methods.custom_diffusion import merge_captions

    world = merge_captions(SimpleNamespace(is_world=True), 6)
    assert len(world) == 6 and all(isinstance(c, str) and c.startswith("a") for c in world) and len(set(world)) > 1
    assert merge_captions(SimpleNamespace(is_world=True), 6) == world, "the same captions every time"
    generic = merge_captions(SimpleNamespace(is_world=False), 200)
    assert len(set(generic)) == 200 and generic == merge_captions(SimpleNamespace(is_world=False), 200)
    assert len({c.split(" of a ")[-1].split(" ")[0] for c in generic}) > 20, "many nouns, not a handful"


def test_custom_diffusion_joint_training_of_two_concepts(tiny_base, tmp_path):
    from limner.methods.custom_diffusion import CustomDiffusion

    cfg = dict(
        prior_preservation=False,
        augment=False,
        train=TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2, checkpoint_every=0),
    )
    out = CustomDiffusion().personalize(
        load_base(str(tiny_base), device="cpu"),
        [subject(), Subject("cube", "box", subject().images)],
        tmp_path / "joint",
        **cfg,
    )
    manifest = json.loads((out / "limner.json").read_text())
    assert manifest["subject"] == ["blob", "cube"] and manifest["tokens"] == ["<new1>", "<new2>"]
    fresh = load_base(str(tiny_base), device="cpu")
    CustomDiffusion().install(fresh, [out])
    assert {"<new1>", "<new2>"} <= set(fresh.pipe.tokenizer.get_vocab())


def test_custom_diffusion_retrieval_builds_its_index_once_and_rebuilds_it_when_the_pool_changes(tmp_path, monkeypatch):
    from PIL import Image

    from limner.methods.custom_diffusion import folder_pool, retrieve

    class MeanColourCLIP:
        """Embeds an image as its mean colour and "a red ..." as red: retrieval by colour, counted."""

        embedded = 0

        def images(self, images):
            self.embedded += len(images)
            return torch.nn.functional.normalize(
                torch.tensor(np.stack([np.asarray(i, float).mean((0, 1)) for i in images])).float(), dim=-1
            )

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
    assert [c for _, c in first] == ["a red thing", "a pink thing"] and clip.embedded == 4, (
        "uncaptioned images are not in the pool"
    )
    again = retrieve(folder_pool(pool_dir), "a red thing", 2, clip, "clip-a")
    assert [c for _, c in again] == ["a red thing", "a pink thing"] and clip.embedded == 4, (
        "the cached index is reused"
    )
    retrieve(folder_pool(pool_dir), "a red thing", 2, clip, "clip-b")
    assert clip.embedded == 8, "another CLIP model gets its own index"
    Image.new("RGB", (16, 16), (10, 10, 10)).save(pool_dir / "pink.png")  # a changed file
    changed = retrieve(folder_pool(pool_dir), "a red thing", 2, clip, "clip-a")
    assert clip.embedded == 12 and [c for _, c in changed][0] == "a red thing"
    assert not list((tmp_path / "cache" / "retrieval").glob("*.tmp"))


@pytest.mark.parametrize("mode", ["crossattn", "crossattn_kv"])
def test_plain_diffusers_runs_a_custom_diffusion_concept_with_its_own_processors(tiny_base, tmp_path, mode):
    """diffusers 0.42's `unet.load_attn_procs` silently does nothing with Custom Diffusion weights. What a
    plain-diffusers user can do instead (the README's notes on formats show the same calls): put a
    CustomDiffusionAttnProcessor on every attn2, load the file into the UNet's state dict (its keys are
    the processors' parameter names) and the token with load_textual_inversion. The UNet then computes
    what limner's install does."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    out = get_method("custom_diffusion").personalize(
        load_base(str(tiny_base), device="cpu"),
        subject(),
        tmp_path / "c",
        mode=mode,
        prior_preservation=False,
        augment=False,
        train=TrainConfig(max_steps=2, batch_size=2, learning_rate=5e-2, checkpoint_every=0),
    )
    # plain diffusers
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    unet = pipe.unet
    processors = {}
    for name, processor in unet.attn_processors.items():
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn2.processor"):
            processor = CustomDiffusionAttnProcessor(
                train_kv=True,
                train_q_out=mode == "crossattn",
                hidden_size=attn.to_q.out_features,
                cross_attention_dim=attn.to_k.in_features,
            )
        processors[name] = processor
    unet.set_attn_processor(processors)
    missing, unexpected = unet.load_state_dict(
        load_file(str(out / "pytorch_custom_diffusion_weights.safetensors")), strict=False
    )
    assert not unexpected
    pipe.load_textual_inversion(str(out / "<new1>.safetensors"), token="<new1>")
    # limner
    base = load_base(str(tiny_base), device="cpu")
    get_method("custom_diffusion").install(base, [out])

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    with torch.no_grad():
        outputs = [
            p.unet(x, t, encoder_hidden_states=p.encode_prompt("a <new1> ball", "cpu", 1, False)[0]).sample
            for p in (pipe, base.pipe)
        ]
        plain = StableDiffusionPipeline.from_pretrained(tiny_base)
        untouched = plain.unet(x, t, encoder_hidden_states=plain.encode_prompt("a ball", "cpu", 1, False)[0]).sample
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert (outputs[0] - untouched).abs().max() > 1e-4


def test_the_papers_merge_meets_its_equality_and_is_the_closest_such_solution_on_the_captions():
    from limner.methods.custom_diffusion.merge import paper_solver

    g = torch.Generator().manual_seed(0)
    W0, C_reg, C = torch.randn(8, 16, generator=g), torch.randn(200, 16, generator=g), torch.randn(3, 16, generator=g)
    V = torch.randn(8, 3, generator=g)
    W = paper_solver(C_reg, C)(W0, V)
    assert torch.allclose(W @ C.t(), V, atol=1e-4), "the paper's constraint holds exactly"
    other = W0 + (V - W0 @ C.t()) @ torch.linalg.pinv(C.t())  # another solution: the minimum-norm update
    assert ((W - W0) @ C_reg.t()).norm() < ((other - W0) @ C_reg.t()).norm()


def test_limner_merge_offers_the_papers_solve_beside_its_own(tiny_base, tmp_path):
    from typer.testing import CliRunner

    from limner.cli import app
    from limner.methods.custom_diffusion import read_weights
    from limner.methods.custom_diffusion.merge import paper_features, prompt_features
    from limner.training.conditioning import PromptEncoder

    a, b = two_custom_diffusion_concepts(tiny_base, tmp_path)
    args = ["merge", str(a), str(b), "--base", str(tiny_base), "--device", "cpu"]
    for solve in ("weighted", "paper"):
        r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / solve), "--solve", solve])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / solve / "limner.json").read_text())["merge"] == solve
    files = [tmp_path / s / "pytorch_custom_diffusion_weights.safetensors" for s in ("weighted", "paper")]
    weights = [read_weights(f) for f in files]
    assert any(not torch.allclose(weights[0][k].float(), weights[1][k].float()) for k in weights[0])
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--solve", "exact"])
    assert r.exit_code == 2 and "--solve 'exact'" in r.output
    # the paper constrains its two prompts from the modifier token through the end token: no padding rows
    base = load_base(str(tiny_base), device="cpu")
    get_method("custom_diffusion").install(base, [a])
    encoder = PromptEncoder(base.pipe, base.resolution)
    manifest = json.loads((a / "limner.json").read_text())
    padded = prompt_features(encoder, ["<new1> ball"], from_token="<new1>")
    # "<new1>", "ball", "</s>" in each of the two prompts (causal: the rows differ between them)
    assert len(paper_features(encoder, manifest)) == 6 < len(padded)


def test_the_papers_recipe_trains_two_concepts_with_mirrored_references_and_one_rare_word_each(tiny_base, tmp_path):
    """recipe=paper: K/V only, mirrored references (whose masks and prompts follow them: a crash before), and
    jointly trained tokens starting from the official code's words in turn (ktn, pll), not all from one."""
    from limner.methods.custom_diffusion import CustomDiffusion

    overrides = dict(recipe="paper", prior_preservation=False, max_steps=2, learning_rate=0.0, checkpoint_every=0)
    out = CustomDiffusion().personalize(
        load_base(str(tiny_base), device="cpu"),
        [subject(), Subject("cube", "box", subject().images)],
        tmp_path,
        **overrides,
    )
    manifest = json.loads((out / "limner.json").read_text())
    assert manifest["config"]["recipe"] == "paper" and manifest["config"]["mode"] == "crossattn_kv"
    assert manifest["config"]["train"]["flip"] and manifest["config"]["train"]["batch_size"] == 2
    pipe = load_base(str(tiny_base), device="cpu").pipe
    emb = pipe.text_encoder.get_input_embeddings().weight
    for token, word in (("<new1>", "ktn"), ("<new2>", "pll")):
        ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
        saved = load_file(out / f"{token}.safetensors")[token].float()
        assert torch.allclose(saved[0], emb[ids].mean(0), atol=1e-3), f"{token} starts from {word!r}"
