"""Small image conversions shared across layers: encoders, the world's probes, the trainer's data and
the world build each turned uint8 pictures into model inputs with their own copy of the same line.
One copy here, in the core layer, so every layer above can use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

ImageLike = Image.Image | np.ndarray


def to_pil(images: list[ImageLike]) -> list[Image.Image]:
    """PIL images as they are, uint8 [H, W, 3] arrays as PIL images (what transformers' processors take)."""
    return [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], the range the world's VAE, CLIP and probes
    were trained on."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def at_64px(images: list[ImageLike]) -> np.ndarray:
    """uint8 [B, 64, 64, 3], the world's resolution: PIL images in RGB, resized to 64 px; arrays are
    taken as they are (already the world's uint8 64 px pictures)."""
    return np.stack(
        [np.asarray(im.convert("RGB").resize((64, 64)) if isinstance(im, Image.Image) else im) for im in images]
    )


BACKGROUND_GREY = 127  # what a cut-out reference shows where its subject is not


def cut_out(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The subject alone on grey: a reference that says nothing about the scene it was photographed in."""
    mask = np.asarray(mask).astype(bool)
    if mask.shape != image.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize(image.shape[1::-1], Image.NEAREST))
    return np.where(mask[..., None], image, np.uint8(BACKGROUND_GREY)).astype(np.uint8)


def write_png(array: np.ndarray, path: Path) -> None:
    """A uint8 picture written as a PNG under a temporary name, then renamed: never half a file at `path`."""
    from limner.io import written_atomically

    with written_atomically(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
