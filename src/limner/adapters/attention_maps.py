"""Cross-attention probability maps, captured while the UNet runs: what FastComposer's localization loss reads.

`capture_cross_attention(unet, blocks)` puts a `CapturingAttnProcessor` on every cross-attention (attn2) layer of
the named blocks; each call then stores its softmax(QK^T / sqrt(d)) maps, [batch x heads, pixels, tokens], under
the layer's name, gradients included, and computes the layer's output exactly as diffusers' `AttnProcessor` does.
`release` puts the layers' own processors back.

`middle_cross_attention_blocks(unet, n)` names the n middle blocks among those that hold cross-attention, in the
UNet's order (down blocks, mid, up blocks), as FastComposer's official code picks its "middle 5 blocks" from
SD 1.5's seven attention blocks (down 0-2, mid, up 1-3): it leaves out the outermost, highest-resolution ones.
"""

from __future__ import annotations

import torch
from torch import nn


def cross_attention_blocks(unet: nn.Module) -> list[str]:
    """The UNet's blocks that hold cross-attention layers, in the order the sample flows through them."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    names += ["mid_block"] + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    held = {name.split(".attentions")[0] for name in unet.attn_processors if name.endswith("attn2.processor")}
    return [name for name in names if name in held]


def middle_cross_attention_blocks(unet: nn.Module, n: int = 5) -> list[str]:
    """The `n` middle cross-attention blocks (all of them where the UNet has `n` or fewer)."""
    blocks = cross_attention_blocks(unet)
    start = max(0, (len(blocks) - n) // 2)
    return blocks[start : start + n]


class CapturingAttnProcessor:
    """diffusers' plain attention computation, keeping the attention probabilities it makes in `store[name]`."""

    def __init__(self, name: str, store: dict[str, torch.Tensor]):
        self.name, self.store = name, store

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, length = context.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store[self.name] = probs
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class CrossAttentionCapture:
    """The capturing processors on the cross-attention layers of some blocks (see the module docstring)."""

    def __init__(self, unet: nn.Module, blocks: list[str]):
        self.unet, self.blocks = unet, list(blocks)
        self.maps: dict[str, torch.Tensor] = {}
        self.previous = dict(unet.attn_processors)
        chosen = {
            name: CapturingAttnProcessor(name.removesuffix(".processor"), self.maps)
            for name in self.previous
            if name.endswith("attn2.processor") and name.split(".attentions")[0] in self.blocks
        }
        if not chosen:
            raise ValueError(f"no cross-attention layer in the blocks {blocks}")
        unet.set_attn_processor(self.previous | chosen)

    def take(self) -> dict[str, torch.Tensor]:
        """The maps of the last forward pass, forgotten here (so a batch's graph is not kept past its step)."""
        maps = dict(self.maps)
        self.maps.clear()
        return maps

    def release(self) -> None:
        self.maps.clear()
        self.unet.set_attn_processor(self.previous)


def capture_cross_attention(unet: nn.Module, blocks: list[str]) -> CrossAttentionCapture:
    return CrossAttentionCapture(unet, blocks)
