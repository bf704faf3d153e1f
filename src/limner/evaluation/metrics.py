"""Metrics as small pure functions of embeddings (rows L2-normalised)."""

from __future__ import annotations

import torch


def mean_similarity_to_references(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """DreamBench's DINO / CLIP-I / Face-Sim: for each generated image, the mean cosine to every
    reference image. Returns one value per generated image."""
    return (generated @ references.t()).mean(dim=1)


def text_alignment(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """CLIP-T: cosine of each image with its own prompt (row i with row i)."""
    return (images * texts).sum(dim=1)


def diversity(embeddings: torch.Tensor) -> float:
    """Mean pairwise cosine distance between images of one prompt (0: identical; higher: more varied).
    Face-Div is this on face embeddings."""
    n = embeddings.shape[0]
    if n < 2:
        return float("nan")
    sims = embeddings @ embeddings.t()
    off_diagonal = sims[~torch.eye(n, dtype=torch.bool)]
    return float((1 - off_diagonal).mean())
