"""Textual Inversion on a tiny random pipeline: what it trains, the norm cap, the placeholder token,
embedding formats from other tools, and the class-noun layout its prompts get in generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import clipped_alone, record_first_step_gradients, subject, ti_config
from safetensors.torch import load_file

from limner.concepts import read_manifest
from limner.errors import LimnerError
from limner.methods import get_method
from limner.models.loading import load_base


def test_textual_inversion_trains_only_the_new_token_and_loads_in_plain_diffusers(tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = load_base(str(tiny_base), device="cpu")
    before = base.pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    out = get_method("textual_inversion").personalize(base, subject(), tmp_path / "c", **ti_config(4))
    after = base.pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[: len(before)], before), "every other row is restored"
    vec = load_file(str(out / "learned_embeds.safetensors"))["<s*>"]
    # the A1111 file is named after the token: A1111 takes a file's name as the trigger word
    assert (
        read_manifest(out)["files"]["a1111"] == "s-star.safetensors" and not (out / "embedding.safetensors").exists()
    )
    assert vec.shape == (4, 32) and (load_file(str(out / "s-star.safetensors"))["emb_params"] == vec).all()
    init = before[base.pipe.tokenizer("ball", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(vec[0].float(), init, atol=1e-3), "the embedding moved"
    assert (out / "train_log.csv").read_text().count("\n") == 5 and (out / "README.md").exists()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with_token = pipe("a <s*> on the beach", num_inference_steps=2, generator=g(), output_type="np").images
    plain = pipe("a ball on the beach", num_inference_steps=2, generator=g(), output_type="np").images
    assert not np.allclose(with_token, plain)
    # the A1111 form loads in plain diffusers too, under the token its name gives, and draws the same
    a1111 = StableDiffusionPipeline.from_pretrained(tiny_base)
    a1111.load_textual_inversion(str(out / "s-star.safetensors"), token="<s*>")
    assert np.allclose(
        a1111("a <s*> on the beach", num_inference_steps=2, generator=g(), output_type="np").images,
        with_token,
        atol=1e-3,
    )


def test_gradient_clipping_sees_only_the_new_tokens_rows(tiny_base, tmp_path, monkeypatch):
    """The optimizer holds whole embedding matrices, but only the new tokens' rows train: the other rows'
    gradients (the prompt's other words get some) are zeroed before clipping, as diffusers' Custom Diffusion
    script does, so they do not inflate the norm the new rows are clipped by."""
    raw, clipped = record_first_step_gradients(monkeypatch)
    base = load_base(str(tiny_base), device="cpu")
    vocab = len(base.pipe.text_encoder.get_input_embeddings().weight)
    get_method("textual_inversion").personalize(base, subject(), tmp_path / "c", **ti_config(1, max_grad_norm=1e-3))
    (g,), (c,) = raw, clipped
    assert g[:vocab].abs().sum() > 0 and g[vocab:].norm() > 1e-3, "the other rows had gradients; the new rows clip"
    assert torch.allclose(c[vocab:], clipped_alone([g[vocab:]], 1e-3)[0], rtol=1e-5, atol=0)
    assert not c[:vocab].any(), "the other rows' gradients are zeroed"


def test_generate_lays_a_textual_inversion_prompt_out_from_the_class_noun_first(tiny_base, tmp_path):
    import json

    from typer.testing import CliRunner

    from limner.cli import app

    concept = get_method("textual_inversion").personalize(
        load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "c", **ti_config(1)
    )

    def settings(*extra):
        out = tmp_path / f"out{len(extra)}"
        r = CliRunner().invoke(
            app,
            [
                "generate",
                "a <s*> with a hat on the beach",
                "-n",
                "1",
                "--steps",
                "10",
                "--base",
                str(tiny_base),
                "--concept",
                str(concept),
                "--out",
                str(out),
                *extra,
            ],
        )
        assert r.exit_code == 0, r.output
        return json.loads((out / "00001.json").read_text())["settings"]

    default = settings()  # Textual Inversion's default: the first fifth of the steps from the class prompt
    assert (default["layout_prompt"], default["layout_steps"]) == ("a ball with a hat on the beach", 2)
    assert settings("--layout-steps", "0")["layout_steps"] == 0
    assert settings("--layout-steps", "4", "--seed", "1")["layout_steps"] == 4


def test_norm_cap_holds_learned_vectors_to_a_multiple_of_the_words_norm(tiny_base, tmp_path):
    """Left free, the vectors outgrow every word of the vocabulary; norm_cap=1 keeps each at most as long
    as the vocabulary's mean word."""

    def learned_norms(folder, **settings):
        base = load_base(str(tiny_base), device="cpu")
        words = base.pipe.text_encoder.get_input_embeddings().weight.detach().norm(dim=-1).mean()
        out = get_method("textual_inversion").personalize(
            base, subject(), tmp_path / folder, **ti_config(4), **settings
        )
        return load_file(str(out / "learned_embeds.safetensors"))["<s*>"].float().norm(dim=-1) / words

    assert learned_norms("free").max() > 1.2
    assert learned_norms("capped", norm_cap=1).max() < 1.01  # fp16 on disk
    with pytest.raises(LimnerError, match="norm_cap"):
        learned_norms("bad", norm_cap=0)


def test_placeholder_already_in_vocabulary(tiny_base, tmp_path):
    with pytest.raises(LimnerError, match="already in the tokenizer"):
        get_method("textual_inversion").personalize(
            load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "c", token="ball", **ti_config(1)
        )


def test_embedding_formats_load_into_a_base(tiny_base, tmp_path):
    from safetensors.torch import save_file

    from limner.methods.textual_inversion import load_embedding

    vec = torch.randn(2, 32)
    save_file({"<a>": vec}, str(tmp_path / "diffusers.safetensors"))
    save_file({"emb_params": vec}, str(tmp_path / "kohya.safetensors"))
    torch.save(
        {"string_to_param": {"*": vec}, "name": "<c>", "string_to_token": {"*": 265}, "step": 100},
        tmp_path / "a1111.pt",
    )
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


@pytest.mark.parametrize(
    "token, name",
    [
        ("<s*>", "s-star"),
        ("<blob>", "blob"),
        ("sks", "sks"),
        ("<new_1>", "new_1"),
        ("<my cat>", "my-cat"),
        ("<*>", "star"),
        ("../<a>/b", "a-b"),
        ("<hund-ß>", "hund-ß"),
        ("<>", "embedding"),
        ("<con>", "con-embedding"),
        ("Lpt1", "Lpt1-embedding"),
        ("learned_embeds", "learned_embeds-a1111"),
        ("<learned_embeds_2>", "learned_embeds_2-a1111"),
        ("x" * 300, "x" * 100),
    ],
)
def test_the_a1111_file_is_named_after_the_token_safely(token, name):
    from limner.methods.textual_inversion import a1111_file_name

    assert a1111_file_name(token) == f"{name}.safetensors"
