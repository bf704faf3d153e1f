"""PhotoMaker v2's ID encoder: the face embedding through a perceiver, two tokens an ID image.

v1 (id_encoder.py) describes each ID image by the CLIP tower's pooled output. v2 (the official
`PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken`) describes it by the face recogniser's identity embedding f_id
(insightface's 512-d ArcFace for real photos; the world's identity embedder here), which asks the CLIP tower's patch
tokens for the rest:

    q_i   = LN(W_2 GELU(W_1 f_id(x_i)))  reshaped to 2 tokens of the fused width   (token_proj, token_norm)
    e_i   = q_i + Perceiver(q_i, H(x_i))                                          (perceiver_resampler: the 2
                                           tokens are the latents; H: the tower's last hidden state, patch tokens)
    s*    = [Fuse(s_class, e_1,1), Fuse(s_class, e_1,2), ..., Fuse(s_class, e_N,2)]
                                           the class token repeated 2N times, copy 2i+k fused with token k of image i

The perceiver is FacePerceiverResampler's: 4 blocks of (attention whose queries are LN(latents) and keys/values
[LN(x); LN(latents)], then LN-Linear-GELU-Linear feed-forward x4 wide, both residual), 128-wide heads, then
proj_out and LayerNorm. The tower's pooled output and its projections are unused in v2; the official file still
carries them (its loader is strict), and so does limner's, so one layout holds both versions.

Names are the official module's (qformer_perceiver.token_proj.{0,2}, .token_norm, .perceiver_resampler.{proj_in,
proj_out, norm_out, layers.N.0.{norm1, norm2, to_q, to_kv, to_out}, layers.N.1.{0, 1, 3}}), so the official
`id_encoder` loads by key. Widths come from the base (the fused width: its text encoders'), the tower (the patch
tokens' width) and the face analysis (the identity embedding's width: 512 for ArcFace, the world's own otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from limner.errors import LimnerError
from limner.methods.photomaker.id_encoder import IDEncoder

NUM_TOKENS = 2  # tokens an ID image gives in v2 (the official num_tokens)
DIM_HEAD = 128  # the official perceiver's head width: heads = fused width // 128
DEPTH = 4
FF_MULT = 4
TOKEN_PROJ_RATIO = 4  # token_proj's hidden layer: 4 x the face embedding's width


class PerceiverAttention(nn.Module):
    """Latents attend to [image features; latents] (queries from the latents only)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # the image features
        self.norm2 = nn.LayerNorm(dim)  # the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        split = [t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v)]
        out = nn.functional.scaled_dot_product_attention(*split)
        return self.to_out(out.transpose(1, 2).flatten(2))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class FacePerceiverResampler(nn.Module):
    """The perceiver whose latents are given (the face tokens), not learned: they read the CLIP patch tokens."""

    def __init__(self, dim: int, embedding_dim: int, depth: int = DEPTH, dim_head: int = DIM_HEAD, ff_mult=FF_MULT):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, dim // dim_head), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for attention, ff in self.layers:
            latents = latents + attention(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class QFormerPerceiver(nn.Module):
    """Face embedding [N, id_dim] + patch tokens [N, P, embedding_dim] -> [N, num_tokens, dim]."""

    def __init__(self, id_embeddings_dim: int, cross_attention_dim: int, num_tokens: int, embedding_dim: int):
        super().__init__()
        if cross_attention_dim < DIM_HEAD or cross_attention_dim % DIM_HEAD:
            raise LimnerError(
                f"PhotoMaker v2's perceiver has {DIM_HEAD}-wide heads; this base's fused text width "
                f"{cross_attention_dim} is not a multiple of {DIM_HEAD}"
            )
        self.num_tokens, self.cross_attention_dim = num_tokens, cross_attention_dim
        hidden = id_embeddings_dim * TOKEN_PROJ_RATIO
        self.token_proj = nn.Sequential(
            nn.Linear(id_embeddings_dim, hidden), nn.GELU(), nn.Linear(hidden, cross_attention_dim * num_tokens)
        )
        self.token_norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(cross_attention_dim, embedding_dim)

    def forward(self, id_embeds: torch.Tensor, last_hidden_state: torch.Tensor) -> torch.Tensor:
        tokens = self.token_norm(self.token_proj(id_embeds).unflatten(-1, (self.num_tokens, -1)))
        return tokens + self.perceiver_resampler(tokens, last_hidden_state)  # residual: the face tokens lead


class IDEncoderV2(IDEncoder):
    """v1's tower, projections and fuse module, and the face embedding's perceiver (qformer_perceiver)."""

    tokens_per_image = NUM_TOKENS

    def __init__(self, vision_config, text_widths: Sequence[int], id_embeddings_dim: int):
        super().__init__(vision_config, text_widths)
        self.id_embeddings_dim = int(id_embeddings_dim)
        self.qformer_perceiver = QFormerPerceiver(
            self.id_embeddings_dim, sum(self.text_widths), NUM_TOKENS, int(self.vision_config.hidden_size)
        )

    def embed(self, pixels: torch.Tensor, id_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """[N, 3, S, S] ID images and their faces' identity embeddings [N, id_dim] -> [N, 2, fused width]."""
        if id_embeds is None or id_embeds.shape != (len(pixels), self.id_embeddings_dim):
            got = None if id_embeds is None else tuple(id_embeds.shape)
            raise LimnerError(
                f"PhotoMaker v2 reads one {self.id_embeddings_dim}-wide face embedding per ID image "
                f"({len(pixels)} images), got {got}: the face analysis gives another width than the checkpoint's"
            )
        patches = self.vision_model(pixel_values=pixels).last_hidden_state  # before post_layernorm, as the official
        return self.qformer_perceiver(id_embeds.to(patches.dtype), patches)

    def trainable_layer_names(self, n: int) -> list[str]:
        """The tower's last `n` layers, the perceiver and the fuse module (v2 reads neither the pooled output nor
        its projections, so they stay as they started)."""
        tail = [p for p in super().trainable_layer_names(n) if p.startswith("vision_model.encoder.layers.")]
        return [*tail, "qformer_perceiver.", "fuse_module."]


def face_width_of(state: dict[str, torch.Tensor], where) -> int:
    """The face embedding's width an official v2 `id_encoder` reads (token_proj's first layer's input)."""
    weight = state.get("qformer_perceiver.token_proj.0.weight")
    if weight is None:
        raise LimnerError(
            f"PhotoMaker v2 checkpoint {where}: id_encoder has no qformer_perceiver.token_proj.0.weight; give the "
            "complete photomaker-v2.bin (or its safetensors conversion)"
        )
    return int(weight.shape[1])
