"""The shared adapter layers (limner.adapters) on a tiny random UNet: IP attention is diffusers' own and
loads both ways, the Resampler is the official one, the fuse MLP touches only trigger positions."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from limner.adapters import (
    FuseMLP,
    image_projection,
    install_ip_attention,
    ip_attention_parameters,
    ip_layer_ids,
    ip_processors,
    ip_state_dict,
    load_ip_state_dict,
    projection_from_state_dict,
    projection_state_dict,
    projection_variant,
    remove_ip_attention,
    resampler,
    set_ip_scale,
    with_image_tokens,
)
from limner.errors import LimnerError

CROSS = 32  # the tiny UNet's cross-attention width (tests/conftest.py)
IMAGE_DIM = 16  # the tiny image encoder's width


def tiny_unet(tiny_base):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").eval()


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 500]),
        torch.randn(2, 7, CROSS, generator=g),
        torch.randn(2, 4, CROSS, generator=g),
    )


@torch.no_grad()
def run(unet, x, t, context, **kwargs):
    return unet(x, t, encoder_hidden_states=context, **kwargs).sample


def randomize_ip_weights(unet, seed=1):
    """Trained adapters differ from their to_k/to_v initialisation: tests must not pass by that coincidence."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ip_attention_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def attn2_outputs(unet, x, t, context, **kwargs):
    """attn2 module name -> its output, in execution order."""
    outputs, hooks = {}, []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o)))
    run(unet, x, t, context, **kwargs)
    for h in hooks:
        h.remove()
    return outputs


# ---------------------------------------------------------------------------------------------------------------
# IP attention: install, scale 0, remove
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "classic"])
def test_ip_attention_at_scale_zero_gives_exactly_the_unet_without_it(tiny_base, backend):
    from diffusers.models.attention_processor import AttnProcessor, IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    unet = tiny_unet(tiny_base)
    if backend == "classic":
        unet.set_attn_processor(AttnProcessor())
    x, t, text, tokens = unet_inputs()
    plain = run(unet, x, t, text)

    installed = install_ip_attention(unet, num_tokens=4, scale=0.0)
    assert set(installed) == {n for n in unet.attn_processors if n.endswith("attn2.processor")}
    expected = IPAdapterAttnProcessor if backend == "classic" else IPAdapterAttnProcessor2_0
    assert all(type(p) is expected for p in installed.values()), "the IP variant of the layer's own backend"
    assert torch.equal(run(unet, x, t, with_image_tokens(text, [tokens])), plain)

    set_ip_scale(unet, 1.0)
    assert not torch.allclose(run(unet, x, t, with_image_tokens(text, [tokens])), plain), "and it acts when on"


def test_ip_projections_start_as_copies_of_the_text_ones_and_attn1_is_untouched(tiny_base):
    unet = tiny_unet(tiny_base)
    before = unet.attn_processors
    install_ip_attention(unet, num_tokens=[4, 16])
    after = unet.attn_processors
    for name, processor in ip_processors(unet).items():
        attn = unet.get_submodule(name.removesuffix(".processor"))
        assert processor.num_tokens == [4, 16] and len(processor.to_k_ip) == 2
        for k_ip, v_ip in zip(processor.to_k_ip, processor.to_v_ip):
            assert torch.equal(k_ip.weight, attn.to_k.weight) and torch.equal(v_ip.weight, attn.to_v.weight)
            assert k_ip.bias is None and v_ip.bias is None
    assert all(after[n] is before[n] for n in before if n.endswith("attn1.processor"))


def test_removing_ip_attention_restores_the_processors_and_the_output_bit_for_bit(tiny_base):
    unet = tiny_unet(tiny_base)
    x, t, text, tokens = unet_inputs()
    plain, before, keys = run(unet, x, t, text), unet.attn_processors, set(unet.state_dict())

    install_ip_attention(unet, num_tokens=4)
    randomize_ip_weights(unet)
    run(unet, x, t, with_image_tokens(text, tokens))
    with pytest.raises(ValueError, match="already installed"):
        install_ip_attention(unet, num_tokens=4)
    remove_ip_attention(unet)

    assert all(unet.attn_processors[n] is p for n, p in before.items()), "the very same processor objects"
    assert set(unet.state_dict()) == keys, "no to_k_ip/to_v_ip left behind"
    assert torch.equal(run(unet, x, t, text), plain)
    with pytest.raises(ValueError, match="no IP attention"):
        remove_ip_attention(unet)
    install_ip_attention(unet, num_tokens=4)  # and it can be installed again


def test_ip_attention_parameters_are_the_ip_projections_and_train(tiny_base):
    unet = tiny_unet(tiny_base)
    install_ip_attention(unet, num_tokens=[4, 4])
    layers = len(ip_layer_ids(unet))
    assert len(ip_attention_parameters(unet)) == 2 * 2 * layers
    second = ip_attention_parameters(unet, adapter=1)
    assert len(second) == 2 * layers
    assert {id(p) for p in second} == {
        id(m.weight) for p in ip_processors(unet).values() for m in (p.to_k_ip[1], p.to_v_ip[1])
    }
    with pytest.raises(ValueError, match="adapter 2"):
        ip_attention_parameters(unet, adapter=2)

    unet.requires_grad_(False)
    for p in ip_attention_parameters(unet):
        p.requires_grad_(True)
    x, t, text, tokens = unet_inputs()
    unet(x, t, encoder_hidden_states=with_image_tokens(text, [tokens, tokens])).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ip_attention_parameters(unet))


# ---------------------------------------------------------------------------------------------------------------
# The official layout, and diffusers' own loader
# ---------------------------------------------------------------------------------------------------------------


def test_ip_state_dict_uses_the_official_layout_numbered_as_diffusers_does(tiny_base):
    unet = tiny_unet(tiny_base)
    install_ip_attention(unet, num_tokens=4)
    ids = ip_layer_ids(unet)
    order = list(unet.attn_processors)
    assert list(ids.values()) == [1, 3, 5, 7]
    assert all(order.index(name) == i for name, i in ids.items()), "each attn2's position in attn_processors"
    state = ip_state_dict(unet)
    assert set(state) == {f"ip_adapter.{i}.{p}.weight" for i in (1, 3, 5, 7) for p in ("to_k_ip", "to_v_ip")}
    assert all(v.shape == (CROSS, CROSS) for v in state.values())


def test_ip_state_dict_round_trips_in_flat_and_nested_layouts_and_refuses_another_unet(tiny_base):
    x, t, text, tokens = unet_inputs()
    trained = tiny_unet(tiny_base)
    install_ip_attention(trained, num_tokens=4)
    randomize_ip_weights(trained)
    state = ip_state_dict(trained)
    expected = run(trained, x, t, with_image_tokens(text, tokens))

    nested = {"image_proj": {}, "ip_adapter": {k.removeprefix("ip_adapter."): v for k, v in state.items()}}
    for layout in (state, nested):
        fresh = tiny_unet(tiny_base)
        install_ip_attention(fresh, num_tokens=4)
        load_ip_state_dict(fresh, layout)
        assert torch.equal(run(fresh, x, t, with_image_tokens(text, tokens)), expected)

    with pytest.raises(LimnerError, match="missing"):
        load_ip_state_dict(fresh, {k: v for k, v in state.items() if ".7." not in k})
    with pytest.raises(LimnerError, match="shape"):
        load_ip_state_dict(fresh, {k: v[:, :8] for k, v in state.items()})


def image_encoder(folder):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=IMAGE_DIM,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=IMAGE_DIM,
        )
    ).save_pretrained(folder / "image_encoder")


# variant -> (projection arguments, image features of one image: pooled [B, D] or patch tokens [B, P, D])
VARIANT_INPUTS = {
    "plain": ({}, (2, IMAGE_DIM)),
    "plus": ({"num_tokens": 4, "dim": 64}, (2, 5, IMAGE_DIM)),
    "full": ({}, (2, 5, IMAGE_DIM)),
    "faceid": ({}, (2, IMAGE_DIM)),
}


@pytest.mark.parametrize("variant", list(VARIANT_INPUTS))
def test_diffusers_load_ip_adapter_runs_limner_weights_exactly_as_limner_does(tiny_base, tmp_path, variant):
    from diffusers import StableDiffusionPipeline

    args, feature_shape = VARIANT_INPUTS[variant]
    torch.manual_seed(2)
    projection = image_projection(variant, IMAGE_DIM, CROSS, **args).eval()
    unet = tiny_unet(tiny_base)
    install_ip_attention(unet, num_tokens=4)
    randomize_ip_weights(unet)
    file = {f"image_proj.{k}": v for k, v in projection_state_dict(projection).items()} | ip_state_dict(unet)
    save_file(file, str(tmp_path / "ip-adapter.safetensors"))
    image_encoder(tmp_path)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip-adapter.safetensors")
    assert pipe.image_encoder is not None, "the adapter folder's image encoder came along"
    pipe.set_ip_adapter_scale(0.7)
    set_ip_scale(unet, 0.7)

    x, t, text, _ = unet_inputs()
    features = torch.randn(feature_shape, generator=torch.Generator().manual_seed(3))
    theirs = run(pipe.unet, x, t, text, added_cond_kwargs={"image_embeds": [features.unsqueeze(1)]})
    with torch.no_grad():
        ours = run(unet, x, t, with_image_tokens(text, projection(features)))
    assert torch.equal(ours, theirs)
    classes = {n: type(p) for n, p in ip_processors(unet).items()}
    assert {n: type(p) for n, p in ip_processors(pipe.unet).items()} == classes
    assert all(torch.equal(v, ip_state_dict(pipe.unet)[k]) for k, v in ip_state_dict(unet).items()), (
        "limner reads back what diffusers loaded"
    )


# ---------------------------------------------------------------------------------------------------------------
# Scales per block (InstantStyle) and region masks
# ---------------------------------------------------------------------------------------------------------------


def scales(unet):
    block = ".transformer_blocks.0.attn2.processor"
    return {name.removesuffix(block): p.scale for name, p in ip_processors(unet).items()}


def test_per_block_scales_change_only_the_named_blocks(tiny_base):
    unet = tiny_unet(tiny_base)
    install_ip_attention(unet, num_tokens=4)
    randomize_ip_weights(unet)

    set_ip_scale(unet, {"up": {"block_1": [0.0, 0.5]}})
    assert scales(unet) == {
        "down_blocks.0.attentions.0": [0.0],
        "mid_block.attentions.0": [0.0],
        "up_blocks.1.attentions.0": [0.0],
        "up_blocks.1.attentions.1": [0.5],
    }
    set_ip_scale(unet, {"down": 1.0, "mid": 0.25})
    assert scales(unet) == {
        "down_blocks.0.attentions.0": [1.0],
        "mid_block.attentions.0": [0.25],
        "up_blocks.1.attentions.0": [0.0],
        "up_blocks.1.attentions.1": [0.0],
    }

    # up_blocks.1.attentions.1 runs last: every attn2 before it sees exactly what it sees at scale 0
    x, t, text, tokens = unet_inputs()
    set_ip_scale(unet, 0.0)
    off = attn2_outputs(unet, x, t, with_image_tokens(text, tokens))
    set_ip_scale(unet, {"up": {"block_1": [0.0, 0.5]}})
    named = attn2_outputs(unet, x, t, with_image_tokens(text, tokens))
    *before, last = named
    assert last == "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    assert all(torch.equal(named[n], off[n]) for n in before)
    assert not torch.allclose(named[last], off[last])


def test_scales_are_per_adapter_when_several_are_installed(tiny_base):
    unet = tiny_unet(tiny_base)
    install_ip_attention(unet, num_tokens=[4, 4])
    set_ip_scale(unet, [0.3, {"mid": 1.0}])
    assert scales(unet) == {
        "down_blocks.0.attentions.0": [0.3, 0.0],
        "mid_block.attentions.0": [0.3, 1.0],
        "up_blocks.1.attentions.0": [0.3, 0.0],
        "up_blocks.1.attentions.1": [0.3, 0.0],
    }
    with pytest.raises(ValueError, match="no IP attention"):
        set_ip_scale(tiny_unet(tiny_base), 0.5)


def test_region_masks_pass_through_cross_attention_kwargs(tiny_base):
    unet = tiny_unet(tiny_base)
    install_ip_attention(unet, num_tokens=4)
    randomize_ip_weights(unet)
    x, t, text, tokens = unet_inputs()
    plain = run(unet, x, t, text)  # a tensor is read as text + the last 4 positions as image tokens...
    set_ip_scale(unet, 0.0)
    text_only = run(unet, x, t, with_image_tokens(text, tokens))  # ...so compare with scale 0 instead
    assert not torch.equal(plain, text_only)
    set_ip_scale(unet, 1.0)
    unmasked = run(unet, x, t, with_image_tokens(text, tokens))
    one_image = with_image_tokens(text, tokens.unsqueeze(1))  # [B, n_images, T, d] with masks

    def masked(value):
        mask = torch.full((1, 1, 16, 16), value)  # [1, n_images, H, W], one per adapter
        return run(unet, x, t, one_image, cross_attention_kwargs={"ip_adapter_masks": [mask]})

    assert torch.allclose(masked(1.0), unmasked, atol=1e-5)
    assert torch.equal(masked(0.0), text_only)


# ---------------------------------------------------------------------------------------------------------------
# Image projections and the Perceiver Resampler
# ---------------------------------------------------------------------------------------------------------------


class OfficialPerceiverAttention(nn.Module):
    """The Resampler's attention as the paper's code computes it, with its parameter names: keys and values
    from one to_kv over [LN(x); LN(latents)], q and k each scaled by dim_head^-1/4, softmax in float32."""

    def __init__(self, dim, dim_head, heads):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def split_heads(self, y):
        return y.view(y.shape[0], y.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.split_heads(self.to_q(latents))
        k, v = map(self.split_heads, self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1))
        s = self.dim_head**-0.25
        weights = ((q * s) @ (k * s).transpose(-1, -2)).float().softmax(dim=-1).to(q.dtype)
        out = (weights @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


class OfficialResampler(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / math.sqrt(dim))
        self.proj_in, self.proj_out = nn.Linear(embedding_dim, dim), nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        inner = int(dim * ff_mult)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    OfficialPerceiverAttention(dim, dim_head, heads),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, inner, bias=False),
                        nn.GELU(),
                        nn.Linear(inner, dim, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x):
        latents, x = self.latents.expand(x.shape[0], -1, -1), self.proj_in(x)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


def perturb_norms(module, seed=4):
    """LayerNorms start at weight 1, bias 0: random ones catch a norm1/norm2 or ln0/ln1 swap."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))


def test_the_resampler_is_the_official_one_after_diffusers_conversion():
    torch.manual_seed(5)
    official = OfficialResampler(
        dim=128, depth=4, dim_head=64, heads=2, num_queries=8, embedding_dim=48, output_dim=CROSS
    )
    perturb_norms(official)
    state = official.state_dict()
    assert {
        "latents",
        "proj_in.weight",
        "norm_out.bias",
        "layers.3.0.norm1.weight",
        "layers.3.0.norm2.weight",
        "layers.3.0.to_q.weight",
        "layers.3.0.to_kv.weight",
        "layers.3.0.to_out.weight",
        "layers.3.1.0.weight",
        "layers.3.1.1.weight",
        "layers.3.1.3.weight",
    } <= set(state)

    ours = projection_from_state_dict(state)
    assert projection_variant(ours) == "plus"
    features = torch.randn(3, 20, 48)
    with torch.no_grad():
        assert torch.allclose(ours(features), official(features), atol=1e-5)
    back = projection_state_dict(ours)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state), "written back unchanged"

    made = resampler(embedding_dim=48, output_dim=CROSS, dim=128, depth=4, num_queries=8)
    assert {k: v.shape for k, v in projection_state_dict(made).items()} == {k: v.shape for k, v in state.items()}


OFFICIAL_KEYS = {
    "plain": {"proj.weight", "proj.bias", "norm.weight", "norm.bias"},
    "full": {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "proj.3.weight", "proj.3.bias"},
    "faceid": {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"},
}


@pytest.mark.parametrize("variant", list(VARIANT_INPUTS))
def test_every_projection_round_trips_through_the_official_names(variant):
    args, feature_shape = VARIANT_INPUTS[variant]
    torch.manual_seed(6)
    projection = image_projection(variant, IMAGE_DIM, CROSS, **args).eval()
    perturb_norms(projection)
    state = projection_state_dict(projection)
    if variant in OFFICIAL_KEYS:
        assert set(state) == OFFICIAL_KEYS[variant]
    nested = {"image_proj": state, "ip_adapter": {}}
    flat = {f"image_proj.{k}": v for k, v in state.items()} | {"ip_adapter.1.to_k_ip.weight": torch.zeros(1)}
    features = torch.randn(feature_shape)
    for layout in (state, nested, flat):
        loaded = projection_from_state_dict(layout).eval()
        assert type(loaded) is type(projection)
        with torch.no_grad():
            assert torch.equal(loaded(features), projection(features))


def test_projection_factory_defaults_and_refusals():
    assert image_projection("plain", IMAGE_DIM, CROSS)(torch.randn(2, IMAGE_DIM)).shape == (2, 4, CROSS)
    assert image_projection("faceid", IMAGE_DIM, CROSS)(torch.randn(2, IMAGE_DIM)).shape == (2, 4, CROSS)
    assert image_projection("plus", IMAGE_DIM, CROSS, dim=64)(torch.randn(2, 5, IMAGE_DIM)).shape == (2, 16, CROSS)
    assert image_projection("full", IMAGE_DIM, CROSS)(torch.randn(2, 5, IMAGE_DIM)).shape == (2, 5, CROSS)
    with pytest.raises(ValueError, match="unknown image projection"):
        image_projection("huge", IMAGE_DIM, CROSS)
    with pytest.raises(ValueError, match="only apply to the plus"):
        image_projection("plain", IMAGE_DIM, CROSS, depth=2)
    for refused in ({"dim": 256, "dim_head": 128}, {"dim": 64, "depth": 2}, {"dim": 64, "ff_mult": 2}, {"dim": 32}):
        with pytest.raises(ValueError, match="dim_head 64, depth 4, ff_mult 4"):
            resampler(embedding_dim=IMAGE_DIM, output_dim=CROSS, **refused)


# ---------------------------------------------------------------------------------------------------------------
# The fuse MLP (FastComposer, PhotoMaker)
# ---------------------------------------------------------------------------------------------------------------


def test_fuse_mlp_keys_and_shapes_are_the_official_ones():
    d = 8
    shapes = {k: tuple(v.shape) for k, v in FuseMLP(d).state_dict().items()}
    assert shapes == {
        "mlp1.layernorm.weight": (2 * d,),
        "mlp1.layernorm.bias": (2 * d,),
        "mlp1.fc1.weight": (d, 2 * d),
        "mlp1.fc1.bias": (d,),
        "mlp1.fc2.weight": (d, d),
        "mlp1.fc2.bias": (d,),
        "mlp2.layernorm.weight": (d,),
        "mlp2.layernorm.bias": (d,),
        "mlp2.fc1.weight": (d, d),
        "mlp2.fc1.bias": (d,),
        "mlp2.fc2.weight": (d, d),
        "mlp2.fc2.bias": (d,),
        "layer_norm.weight": (d,),
        "layer_norm.bias": (d,),
    }
    assert FuseMLP(d, image_embed_dim=12).state_dict()["mlp1.fc1.weight"].shape == (d, d + 12)


def test_fuse_mlp_computes_the_official_formula():
    torch.manual_seed(7)
    fuse = FuseMLP(8)
    perturb_norms(fuse)
    t, e = torch.randn(5, 8), torch.randn(5, 8)
    s = fuse.state_dict()

    def mlp(prefix, x):
        h = nn.functional.layer_norm(x, x.shape[-1:], s[f"{prefix}.layernorm.weight"], s[f"{prefix}.layernorm.bias"])
        h = nn.functional.gelu(h @ s[f"{prefix}.fc1.weight"].T + s[f"{prefix}.fc1.bias"])
        return h @ s[f"{prefix}.fc2.weight"].T + s[f"{prefix}.fc2.bias"]

    h = t + mlp("mlp1", torch.cat([t, e], dim=-1))
    h = h + mlp("mlp2", h)
    expected = nn.functional.layer_norm(h, (8,), s["layer_norm.weight"], s["layer_norm.bias"])
    with torch.no_grad():
        assert torch.allclose(fuse(t, e), expected, atol=1e-6)


def test_fuse_at_replaces_only_the_trigger_positions():
    torch.manual_seed(8)
    fuse = FuseMLP(8)
    text, images = torch.randn(2, 10, 8), torch.randn(2, 2, 8)
    original = text.clone()
    # sample 0: two images on a stacked class word (PhotoMaker); sample 1: one image, the second row unused
    out = fuse.fuse_at(text, images, [[3, 4], [6]])
    assert torch.equal(text, original), "the input is not modified"
    changed = (out != text).any(dim=-1)
    assert changed.nonzero().tolist() == [[0, 3], [0, 4], [1, 6]]
    assert torch.allclose(out[0, 4], fuse(text[0, 4], images[0, 1]), atol=1e-6)
    assert torch.allclose(out[1, 6], fuse(text[1, 6], images[1, 0]), atol=1e-6)
    assert torch.equal(fuse.fuse_at(text, images, torch.tensor([[3, 4], [6, -1]])), out)

    out.square().sum().backward()
    assert all(p.grad is not None for p in fuse.parameters())
    with pytest.raises(ValueError, match="share a trigger position"):
        fuse.fuse_at(text, images, [[3, 3], [6]])
    with pytest.raises(ValueError, match="past the sequence"):
        fuse.fuse_at(text, images, [[3, 10], [6]])
    with pytest.raises(ValueError, match="a row per sample"):
        fuse.fuse_at(text, images, [[3, 4]])
