"""The fuse MLP of FastComposer (Xiao et al., 2023) and PhotoMaker (Li et al., 2024): image embeddings written
into the text encoder's output at the trigger word's positions.

For each trigger position (FastComposer: the noun before "<|image|>", one per subject; PhotoMaker: the class
word, repeated once per ID image, each copy taking one image), with t the text embedding there and e the
image embedding:

    h = t + mlp1([t ; e])          mlp1: LN -> Linear(d_t + d_e -> d) -> GELU -> Linear(d -> d), no residual
    h = h + mlp2(h)                mlp2: LN -> Linear(d -> d) -> GELU -> Linear(d -> d)
    out = LayerNorm(h)

Submodule names are the official ones (mlp1.{layernorm, fc1, fc2}, mlp2.{...}, layer_norm), so FastComposer's
`postfuse_module.*` and PhotoMaker's `fuse_module.*` weights load by key once their prefix is stripped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class _PreNormMLP(nn.Module):
    """LN -> fc1 -> GELU -> fc2, optionally added to its input."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, residual: bool):
        super().__init__()
        if residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP keeps its width; got {in_dim} -> {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(nn.functional.gelu(self.fc1(self.layernorm(x))))
        return x + y if self.residual else y


class FuseMLP(nn.Module):
    """Fuses a text token embedding [.., d] with an image embedding [.., d_image] into one token [.., d].

    embed_dim: the text encoder's output width (SD 1.5 768; PhotoMaker's SDXL 2048 = 768 + 1280);
    image_embed_dim: the image embedding's width, embed_dim unless given (both official models use equal widths).
    """

    def __init__(self, embed_dim: int, image_embed_dim: int | None = None):
        super().__init__()
        image_embed_dim = image_embed_dim or embed_dim
        self.mlp1 = _PreNormMLP(embed_dim + image_embed_dim, embed_dim, embed_dim, residual=False)
        self.mlp2 = _PreNormMLP(embed_dim, embed_dim, embed_dim, residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Pairwise: text_embeds [..., d] and image_embeds [..., d_image] with the same leading shape."""
        image_embeds = image_embeds.to(text_embeds.dtype)
        fused = text_embeds + self.mlp1(torch.cat([text_embeds, image_embeds], dim=-1))
        return self.layer_norm(self.mlp2(fused))

    def fuse_at(
        self, text_embeds: torch.Tensor, image_embeds: torch.Tensor, positions: torch.Tensor | Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """text_embeds [B, L, d] with position positions[b][k] replaced by the fusion of that token and image
        k of sample b (image_embeds [B, N, d_image]). Other positions are untouched; the input is not modified.

        positions: [B, N] token indices, one per image; -1 (or a shorter row) marks a sample with fewer images,
        whose extra image rows are ignored."""
        batch, seq_len = text_embeds.shape[:2]
        if image_embeds.shape[0] != batch:
            raise ValueError(f"{image_embeds.shape[0]} samples of image embeddings for {batch} of text")
        rows, images, tokens = _trigger_indices(positions, batch, seq_len, image_embeds.shape[1], text_embeds.device)
        fused = self(text_embeds[rows, tokens], image_embeds[rows, images])
        return text_embeds.index_put((rows, tokens), fused.to(text_embeds.dtype))


def _position_matrix(positions: torch.Tensor | Sequence[Sequence[int]], batch: int, num_images: int) -> torch.Tensor:
    """[batch, num_images] long tensor, rows padded with -1."""
    if isinstance(positions, torch.Tensor):
        matrix = positions.long()
    else:
        if any(len(row) > num_images for row in positions):
            raise ValueError(f"more trigger positions than images ({num_images}) in a sample")
        matrix = torch.tensor([list(row) + [-1] * (num_images - len(row)) for row in positions], dtype=torch.long)
    if tuple(matrix.shape) != (batch, num_images):
        raise ValueError(
            f"positions must be [{batch}, {num_images}] (a row per sample, one per image); "
            f"got shape {tuple(matrix.shape)}"
        )
    return matrix


def _trigger_indices(
    positions: torch.Tensor | Sequence[Sequence[int]], batch: int, seq_len: int, num_images: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, image, token) index triples of every used trigger position."""
    matrix = _position_matrix(positions, batch, num_images).to(device)
    rows, images = (matrix >= 0).nonzero(as_tuple=True)
    tokens = matrix[rows, images]
    if (tokens >= seq_len).any():
        raise ValueError(f"a trigger position lies past the sequence ({seq_len} tokens)")
    if (rows * seq_len + tokens).unique().numel() != tokens.numel():
        raise ValueError("two images of one sample share a trigger position; each image needs its own token")
    return rows, images, tokens
