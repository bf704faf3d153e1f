"""Image projections: what turns image-encoder features into the tokens that IP attention reads.

    plain   IP-Adapter: pooled image embedding -> Linear -> 4 tokens -> LayerNorm     (diffusers' ImageProjection)
    plus    IP-Adapter Plus, InstantID: the Perceiver Resampler, below         (IPAdapterPlusImageProjection)
    full    IP-Adapter Full: an MLP on every patch token, then LayerNorm       (IPAdapterFullImageProjection)
    faceid  IP-Adapter FaceID: 512-d face embedding -> MLP -> 4 tokens       (IPAdapterFaceIDImageProjection)

The Perceiver Resampler: `num_queries` learned latents read the projected patch tokens x through `depth` blocks
of (attention whose keys and values are [LN(x); LN(latents)], queries LN(latents); then a LayerNorm-GELU
feed-forward, both residual), then proj_out and LayerNorm. diffusers' IPAdapterPlusImageProjection is that same
module, so limner uses it rather than a copy: a projection limner trains is the module diffusers' loader builds.

Only the names differ from the official files' `image_proj.*` entries: `projection_state_dict` writes the
official names (for the Resampler: layers.N.0.{norm1, norm2, to_q, to_kv, to_out}, layers.N.1.{0, 1, 3}),
and `projection_from_state_dict` reads them with diffusers' own converter, the code `load_ip_adapter` runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

VARIANTS = ("plain", "plus", "full", "faceid")

# diffusers' converter reads heads as to_q rows // 64 and builds the Resampler with its default depth (4) and
# feed-forward width (x4): a Resampler it can load has exactly those, as every official one does.
_LOADABLE = {"dim_head": 64, "depth": 4, "ff_mult": 4}

# limner (diffusers) name -> official name, per variant; the Resampler's to_k and to_v are fused apart.
_OFFICIAL_NAMES = {
    "plain": [(r"^image_embeds\.", "proj.")],
    "full": [(r"^ff\.net\.0\.proj\.", "proj.0."), (r"^ff\.net\.2\.", "proj.2."), (r"^norm\.", "proj.3.")],
    "faceid": [(r"^ff\.net\.0\.proj\.", "proj.0."), (r"^ff\.net\.2\.", "proj.2.")],
    "plus": [
        (r"^layers\.(\d+)\.ln0\.", r"layers.\1.0.norm1."),
        (r"^layers\.(\d+)\.ln1\.", r"layers.\1.0.norm2."),
        (r"^layers\.(\d+)\.attn\.to_q\.", r"layers.\1.0.to_q."),
        (r"^layers\.(\d+)\.attn\.to_out\.0\.", r"layers.\1.0.to_out."),
        (r"^layers\.(\d+)\.ff\.0\.", r"layers.\1.1.0."),
        (r"^layers\.(\d+)\.ff\.1\.net\.0\.proj\.", r"layers.\1.1.1."),
        (r"^layers\.(\d+)\.ff\.1\.net\.2\.", r"layers.\1.1.3."),
    ],
}


def _classes() -> dict[str, type]:
    from diffusers.models.embeddings import (
        ImageProjection,
        IPAdapterFaceIDImageProjection,
        IPAdapterFullImageProjection,
        IPAdapterPlusImageProjection,
    )

    return {
        "plain": ImageProjection,
        "plus": IPAdapterPlusImageProjection,
        "full": IPAdapterFullImageProjection,
        "faceid": IPAdapterFaceIDImageProjection,
    }


def resampler(
    *,
    embedding_dim: int,
    output_dim: int,
    dim: int = 768,
    depth: int = 4,
    dim_head: int = 64,
    heads: int | None = None,
    num_queries: int = 16,
    ff_mult: float = 4,
) -> nn.Module:
    """The Perceiver Resampler, with the official argument names (IP-Adapter Plus for SD 1.5: dim 768, heads 12,
    16 queries, embedding_dim 1280 from ViT-H; InstantID: dim 1280, heads 20, 16 queries, embedding_dim 512).

    embedding_dim: width of the image features it reads; output_dim: the UNet's cross-attention width;
    heads: dim // dim_head unless given."""
    heads = heads or dim // dim_head
    asked = {"dim_head": dim_head, "depth": depth, "ff_mult": ff_mult}
    if asked != _LOADABLE or heads < 1:
        raise ValueError(
            "diffusers' loader reads only Resamplers with dim_head 64, depth 4, ff_mult 4 and "
            f"dim >= 64; got {asked | {'dim': dim}}"
        )
    return _classes()["plus"](
        embed_dims=embedding_dim,
        output_dims=output_dim,
        hidden_dims=dim,
        depth=depth,
        dim_head=dim_head,
        heads=heads,
        num_queries=num_queries,
        ffn_ratio=ff_mult,
    )


def image_projection(
    variant: str,
    image_embed_dim: int,
    cross_attention_dim: int,
    num_tokens: int | None = None,
    **resampler_args: int | float,
) -> nn.Module:
    """A new image projection of one variant (see the module docstring).

    image_embed_dim: the encoder feature width (pooled embedding for plain/faceid, patch tokens for plus/full);
    num_tokens: tokens out (plain 4, plus 16, faceid 4 by default; full keeps one per patch token);
    resampler_args: dim, depth, heads, ff_mult of the Resampler (plus only)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown image projection {variant!r}; choose one of {', '.join(VARIANTS)}")
    if resampler_args and variant != "plus":
        raise ValueError(f"{', '.join(resampler_args)} only apply to the plus projection (the Resampler)")
    cls = _classes()[variant]
    if variant == "plain":
        return cls(
            image_embed_dim=image_embed_dim,
            cross_attention_dim=cross_attention_dim,
            num_image_text_embeds=num_tokens or 4,
        )
    if variant == "plus":
        return resampler(
            embedding_dim=image_embed_dim,
            output_dim=cross_attention_dim,
            num_queries=num_tokens or 16,
            **resampler_args,
        )
    if variant == "full":
        return cls(image_embed_dim=image_embed_dim, cross_attention_dim=cross_attention_dim)
    # FaceID's MLP widens the face embedding 2x before projecting it to the tokens
    return cls(
        image_embed_dim=image_embed_dim, cross_attention_dim=cross_attention_dim, mult=2, num_tokens=num_tokens or 4
    )


def projection_variant(module: nn.Module) -> str:
    """Which of VARIANTS a projection module is."""
    for variant, cls in _classes().items():
        if type(module) is cls:
            return variant
    raise TypeError(f"{type(module).__name__} is not one of limner's image projections ({', '.join(VARIANTS)})")


def _fuse_kv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official Resampler computes keys and values with one to_kv layer: rows [keys; values]."""
    fused = {}
    for key, value in state.items():
        if match := re.fullmatch(r"layers\.(\d+)\.attn\.to_k\.weight", key):
            fused[f"layers.{match[1]}.0.to_kv.weight"] = torch.cat([value, state[key.replace("to_k", "to_v")]])
        elif not re.fullmatch(r"layers\.(\d+)\.attn\.to_v\.weight", key):
            fused[key] = value
    return fused


def _official_name(key: str, renames: list[tuple[str, str]]) -> str:
    for pattern, replacement in renames:
        key, n = re.subn(pattern, replacement, key)
        if n:
            break
    return key


def projection_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A projection's weights under the official names, without the "image_proj." prefix."""
    variant = projection_variant(module)
    state = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    if variant == "plus":
        state = _fuse_kv(state)
    return {_official_name(key, _OFFICIAL_NAMES[variant]): value for key, value in state.items()}


def _image_proj_entries(state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The image_proj entries of an official file: nested ({"image_proj": {...}}), flat with "image_proj."
    prefixes (.safetensors), or already without the prefix."""
    if isinstance(state.get("image_proj"), Mapping):
        return dict(state["image_proj"])
    prefix = "image_proj."
    if any(key.startswith(prefix) for key in state):
        return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    return {key: value for key, value in state.items() if not key.startswith("ip_adapter.")}


def projection_from_state_dict(state: Mapping[str, object]) -> nn.Module:
    """The projection an official file describes, built and loaded by diffusers' own converter (the variant
    follows from the keys: proj.weight plain, proj.3.weight full, norm.weight faceid, latents plus)."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    # the converter is a UNet method but reads `self` only for low_cpu_mem_usage, which is off here
    return UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, _image_proj_entries(state), low_cpu_mem_usage=False
    )


def projected_once(projections: list[nn.Module]) -> nn.Module:
    """diffusers' MultiIPAdapterImageProjection over `projections`, for generation: the pipeline hands the UNet
    the same image-embedding tensors at every denoising step (and every region's window), so their projection,
    a whole Resampler for IP-Adapter Plus, is computed once per generation instead of once per UNet call.
    Parameter names are diffusers' (`image_projection_layers.N...`); with gradients on it computes every time."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    class ProjectedOnce(MultiIPAdapterImageProjection):
        def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
            if torch.is_grad_enabled():
                return super().forward(image_embeds)
            last = self.__dict__.get("_last")  # (the inputs, kept alive so no other tensor reuses them; versions)
            if last is not None and len(last[0]) == len(image_embeds):
                same = all(a is b and a._version == v for a, b, v in zip(last[0], image_embeds, last[1]))
                if same:
                    return last[2]
            out = super().forward(image_embeds)
            self.__dict__["_last"] = (list(image_embeds), [e._version for e in image_embeds], out)
            return out

    return ProjectedOnce(projections)
