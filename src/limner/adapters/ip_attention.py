"""Decoupled image cross-attention (IP-Adapter, Ye et al., 2023), shared by IP-Adapter, InstantID and StoryMaker.

Every cross-attention layer (attn2) gets a second key/value projection that reads image tokens c_i beside
the text tokens c_t, and the two attention outputs add:

    out = Attention(q, W_k c_t, W_v c_t) + scale * Attention(q, W_k' c_i, W_v' c_i)

Only W_k' and W_v' (`to_k_ip`, `to_v_ip`, no bias) are new; they start as copies of the layer's W_k and W_v,
as the official training does. The processor is diffusers' own `IPAdapterAttnProcessor2_0` (the classic
`IPAdapterAttnProcessor` where the layer ran the classic `AttnProcessor`), so what limner trains is exactly
what `pipe.load_ip_adapter` runs, and an adapter diffusers loaded can be read back here.

Calling the UNet. Image tokens travel with the text as a tuple, one tensor per installed adapter:

    unet(x, t, encoder_hidden_states=with_image_tokens(text_embeds, [tokens]))

with tokens [B, T, d_cross], or [B, n_images, T, d_cross] for several images (their tokens are attended
together). Once IP attention is installed, never pass the text alone: diffusers then takes the last
num_tokens[0] text positions for image tokens (a deprecated path it still keeps).

Region masks (several subjects, each in its own region) are diffusers' too: pass
`cross_attention_kwargs={"ip_adapter_masks": [mask_0, mask_1, ...]}` to the UNet (or the pipeline), one entry
per adapter, each a [1, n_images, H, W] tensor in [0, 1] (`IPAdapterMaskProcessor.preprocess` makes them from
PIL masks), or None for an unmasked adapter. That adapter's tokens must then be [B, n_images, T, d_cross]:
image k's attention output is multiplied by mask k, resized to each layer's resolution.

The official file layout is `ip_adapter.{i}.to_k_ip.weight` / `ip_adapter.{i}.to_v_ip.weight` (beside the
projection's `image_proj.*`). diffusers' loader numbers the cross-attention layers 1, 3, 5, ... in
`unet.attn_processors` order; in SD 1.x/2.x and SDXL, where every attn2 follows its attn1, that is each
attn2's position in that order, which is how the official scripts index them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from limner.errors import LimnerError

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

# Attribute on the UNet: attn2 processor name -> the processor that IP attention replaced there.
_REPLACED = "_limner_ip_replaced"
_PROJECTIONS = ("to_k_ip", "to_v_ip")

# A scale as diffusers' set_ip_adapter_scale takes it: a number, an InstantStyle dict such as
# {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}, or a list of those, one per adapter.
IPScale = float | dict | list


def _ip_processor_classes() -> tuple[type, ...]:
    from diffusers.models.attention_processor import (
        IPAdapterAttnProcessor,
        IPAdapterAttnProcessor2_0,
        IPAdapterXFormersAttnProcessor,
    )

    return IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor


def _processor_class_for(current: object) -> type:
    """The IP processor that computes attention the way the layer's current processor does: the classic
    variant calls attn.get_attention_scores, which attention-map losses hook (FastComposer, StoryMaker)."""
    from diffusers.models.attention_processor import AttnProcessor

    classic, sdpa, xformers = _ip_processor_classes()
    if "XFormers" in type(current).__name__:  # diffusers' loader makes the same choice
        return xformers
    if isinstance(current, AttnProcessor) or not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return classic
    return sdpa


def _plain_linear(module: nn.Module) -> nn.Module:
    """The linear layer itself, also when a LoRA (peft) wraps it: W_k' copies the base weight, not W_k + BA."""
    return getattr(module, "base_layer", module)


def ip_layer_ids(unet: UNet2DConditionModel) -> dict[str, int]:
    """attn2 processor name -> its index i in the official layout (`ip_adapter.{i}.to_k_ip.weight`).

    Counted as diffusers' loader counts: every processor but self-attention (and motion modules) is a
    cross-attention slot, numbered 1, 3, 5, ... The loader counts before it attaches the image projection,
    so the attention inside a Resampler it attached (encoder_hid_proj) is no slot. A UNet with other
    cross-attention slots cannot be written in this layout: it is refused rather than numbered differently."""
    ids, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name or name.startswith("encoder_hid_proj."):
            continue
        if not name.endswith("attn2.processor"):
            raise ValueError(
                f"{name} is a cross-attention slot that is not an attn2: the official IP-Adapter layout "
                "is defined for UNets whose attention layers are attn1/attn2 pairs (SD 1.x/2.x, SDXL)"
            )
        ids[name] = key_id
        key_id += 2
    return ids


def _new_ip_processor(attn: nn.Module, current: object, num_tokens: list[int], scale: float) -> nn.Module:
    to_k, to_v = _plain_linear(attn.to_k), _plain_linear(attn.to_v)
    processor = _processor_class_for(current)(
        hidden_size=to_k.out_features, cross_attention_dim=to_k.in_features, num_tokens=num_tokens, scale=scale
    )
    with torch.no_grad():  # image keys and values start where the text ones are (paper, official training)
        for k_ip, v_ip in zip(processor.to_k_ip, processor.to_v_ip):
            k_ip.weight.copy_(to_k.weight)
            v_ip.weight.copy_(to_v.weight)
    return processor.to(device=to_k.weight.device, dtype=to_k.weight.dtype)


def install_ip_attention(
    unet: UNet2DConditionModel, num_tokens: int | list[int] = 4, scale: float = 1.0
) -> dict[str, nn.Module]:
    """Puts an IP processor on every attn2; attn1 and every other processor stay as they are.

    num_tokens: the image tokens of each adapter (a list installs several adapters side by side, as
    diffusers does for several IP-Adapters; a single int installs one). Returns attn2 processor name ->
    the new processor. `remove_ip_attention` puts the replaced processors back."""
    if hasattr(unet, _REPLACED):
        raise ValueError("IP attention is already installed on this UNet; call remove_ip_attention(unet) first")
    counts = [num_tokens] if isinstance(num_tokens, int) else list(num_tokens)
    current = unet.attn_processors
    installed = {}
    for name in ip_layer_ids(unet):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        installed[name] = _new_ip_processor(attn, current[name], counts, scale)
    unet.set_attn_processor({**current, **installed})  # a fresh dict: set_attn_processor empties the one it gets
    setattr(unet, _REPLACED, {name: current[name] for name in installed})
    return installed


def remove_ip_attention(unet: UNet2DConditionModel) -> None:
    """Puts back the very processor objects that install_ip_attention replaced."""
    replaced = getattr(unet, _REPLACED, None)
    if replaced is None:
        raise ValueError("no IP attention installed by install_ip_attention on this UNet")
    unet.set_attn_processor({**unet.attn_processors, **replaced})
    delattr(unet, _REPLACED)


def ip_processors(unet: UNet2DConditionModel) -> dict[str, nn.Module]:
    """attn2 processor name -> IP processor, whoever installed it (limner, or diffusers' load_ip_adapter)."""
    classes = _ip_processor_classes()
    found = {name: p for name, p in unet.attn_processors.items() if isinstance(p, classes)}
    if not found:
        raise ValueError("this UNet has no IP attention: call install_ip_attention(unet, ...) first")
    return found


def _adapter_count(unet: UNet2DConditionModel) -> int:
    return len(next(iter(ip_processors(unet).values())).to_k_ip)


def _check_adapter(unet: UNet2DConditionModel, adapter: int) -> None:
    if not 0 <= adapter < _adapter_count(unet):
        raise ValueError(f"adapter {adapter} does not exist: {_adapter_count(unet)} IP adapter(s) are installed")


def ip_attention_parameters(unet: UNet2DConditionModel, adapter: int | None = None) -> list[nn.Parameter]:
    """The trainable weights of IP attention (to_k_ip, to_v_ip of every attn2), of one adapter or of all."""
    if adapter is not None:
        _check_adapter(unet, adapter)
    params = []
    for processor in ip_processors(unet).values():
        for proj in _PROJECTIONS:
            layers = getattr(processor, proj)
            chosen = layers if adapter is None else [layers[adapter]]
            params += [p for layer in chosen for p in layer.parameters()]
    return params


class _UNetOnly:
    """Stands in for a pipeline: diffusers' set_ip_adapter_scale reads nothing but `self.unet`."""

    def __init__(self, unet: UNet2DConditionModel):
        self.unet = unet


def set_ip_scale(unet: UNet2DConditionModel, scale: IPScale) -> None:
    """Sets the image scale of every IP processor, or per block as InstantStyle does.

    scale is what diffusers' `pipe.set_ip_adapter_scale` takes, and it runs diffusers' own code, so block
    names and defaults mean the same in limner and diffusers:
      - a number: every layer;
      - a dict naming blocks: {"down": {"block_2": [0.0, 1.0]}, "mid": 0.0, "up": {"block_0": [0.0, 1.0, 0.0]}},
        one entry per transformer of the block ("block_0": 1.0 sets them all); unnamed blocks get 0.0;
      - a list of those, one per installed adapter.
    """
    from diffusers.loaders.ip_adapter import IPAdapterMixin

    ip_processors(unet)  # diffusers would silently do nothing on a UNet without IP attention
    IPAdapterMixin.set_ip_adapter_scale(_UNetOnly(unet), scale)


def ip_state_dict(unet: UNet2DConditionModel, adapter: int = 0) -> dict[str, torch.Tensor]:
    """One adapter's IP attention weights in the official layout: {"ip_adapter.{i}.to_k_ip.weight": ...}."""
    _check_adapter(unet, adapter)
    ids = ip_layer_ids(unet)
    return {
        f"ip_adapter.{ids[name]}.{proj}.weight": getattr(processor, proj)[adapter].weight.detach().cpu().clone()
        for name, processor in ip_processors(unet).items()
        for proj in _PROJECTIONS
    }


def _ip_entries(state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """ "{i}.to_k_ip.weight" -> tensor, from a flat file ("ip_adapter." prefixes, as in .safetensors) or the
    nested .bin layout ({"image_proj": {...}, "ip_adapter": {...}}). Other entries (image_proj.*) are ignored."""
    if isinstance(state.get("ip_adapter"), Mapping):
        return dict(state["ip_adapter"])
    return {key.removeprefix("ip_adapter."): value for key, value in state.items() if key.startswith("ip_adapter.")}


def load_ip_state_dict(unet: UNet2DConditionModel, state: Mapping[str, object], adapter: int = 0) -> None:
    """Copies official-layout IP attention weights into one installed adapter. Every attn2 must be covered
    and nothing else may be: a file made for another UNet layout is refused, not half loaded."""
    _check_adapter(unet, adapter)
    entries = _ip_entries(state)
    processors = ip_processors(unet)
    wanted = {
        f"{i}.{proj}.weight": (processors[name], proj)
        for name, i in ip_layer_ids(unet).items()
        for proj in _PROJECTIONS
    }
    missing, unexpected = sorted(wanted.keys() - entries.keys()), sorted(entries.keys() - wanted.keys())
    if missing or unexpected:
        raise LimnerError(
            f"IP-Adapter weights do not match this UNet (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}): were they trained for another base?"
        )
    with torch.no_grad():
        for key, (processor, proj) in wanted.items():
            weight = getattr(processor, proj)[adapter].weight
            if weight.shape != entries[key].shape:
                raise LimnerError(
                    f"IP-Adapter weight ip_adapter.{key} has shape {tuple(entries[key].shape)}, "
                    f"this UNet needs {tuple(weight.shape)}: was it trained for another base?"
                )
            weight.copy_(entries[key])


def with_image_tokens(
    text_embeds: torch.Tensor, image_tokens: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The UNet's encoder_hidden_states with image tokens: (text [B, L, d], [tokens of adapter 0, ...])."""
    tokens = [image_tokens] if isinstance(image_tokens, torch.Tensor) else list(image_tokens)
    return text_embeds, [t.to(text_embeds.dtype) for t in tokens]
