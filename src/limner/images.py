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


def crop_to_subject(image: np.ndarray, mask: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """The subject cut out on grey, then its square box (with `margin` of its side on each edge) resized back to
    the picture's size: the subject fills the frame, so a small encoder's patches see its small marks (a
    subject a third of a 64 px picture wide brings its 3-5 px emblem to 8-12 px). An empty mask: the cut-out."""
    picture = cut_out(image, mask)
    mask = np.asarray(mask).astype(bool)
    if mask.shape != picture.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize(picture.shape[1::-1], Image.NEAREST))
    if not mask.any():
        return picture
    h, w = picture.shape[:2]
    ys, xs = np.nonzero(mask)
    side = int(max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * (1 + 2 * margin)) + 1
    top, left = (ys.min() + ys.max() + 1) // 2 - side // 2, (xs.min() + xs.max() + 1) // 2 - side // 2
    canvas = np.full((side, side, 3), BACKGROUND_GREY, np.uint8)  # the box may reach past the picture's edges
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + side, h), min(left + side, w)
    canvas[y0 - top : y1 - top, x0 - left : x1 - left] = picture[y0:y1, x0:x1]
    return np.asarray(Image.fromarray(canvas).resize((w, h), Image.BICUBIC))


def write_png(array: np.ndarray, path: Path) -> None:
    """A uint8 picture written as a PNG under a temporary name, then renamed: never half a file at `path`."""
    from limner.io import written_atomically

    with written_atomically(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
