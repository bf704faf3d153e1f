"""Shared layers of the encoder and identity methods: pretrained once, then conditioning any generation.

    ip_attention  decoupled image cross-attention on every attn2 (diffusers' IP-Adapter processors), the
                  official `ip_adapter.{i}.to_k_ip/to_v_ip` layout, per-block scales, region masks:
                  IP-Adapter, InstantID (its 16 ID tokens), StoryMaker (character + background tokens)
    resampler     image projections (diffusers' classes, official `image_proj.*` names): the Perceiver
                  Resampler for IP-Adapter Plus and InstantID; plain, full and FaceID for IP-Adapter
    fuse          the fuse MLP at trigger-word positions of the text encoder's output: FastComposer
                  (one subject per noun), PhotoMaker (the class word stacked once per ID image)

BLIP-Diffusion uses none of these: its subject embeddings enter the token embeddings before the text
transformer (its Q-Former and projection layer are its own).
"""

from limner.adapters.fuse import FuseMLP
from limner.adapters.ip_attention import (
    install_ip_attention,
    ip_attention_parameters,
    ip_layer_ids,
    ip_processors,
    ip_state_dict,
    load_ip_state_dict,
    remove_ip_attention,
    set_ip_scale,
    with_image_tokens,
)
from limner.adapters.resampler import (
    VARIANTS,
    image_projection,
    projected_once,
    projection_from_state_dict,
    projection_state_dict,
    projection_variant,
    resampler,
)

__all__ = [
    "VARIANTS",
    "FuseMLP",
    "image_projection",
    "projected_once",
    "install_ip_attention",
    "ip_attention_parameters",
    "ip_layer_ids",
    "ip_processors",
    "ip_state_dict",
    "load_ip_state_dict",
    "projection_from_state_dict",
    "projection_state_dict",
    "projection_variant",
    "remove_ip_attention",
    "resampler",
    "set_ip_scale",
    "with_image_tokens",
]
