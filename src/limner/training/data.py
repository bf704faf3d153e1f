"""Instance data for tuning methods: reference images -> cached latents (and flips) -> batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from limner.errors import LimnerError
from limner.images import to_unit_range


def fit_square(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize the shorter side to `resolution` and centre-crop: the usual instance preprocessing."""
    im = Image.fromarray(image).convert("RGB")
    w, h = im.size
    s = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return np.asarray(im.crop((left, top, left + resolution, top + resolution)))


def fit_points(keypoints: np.ndarray, size: tuple[int, int], width: int, height: int) -> np.ndarray:
    """Points of a picture of `size` (w, h) in a width x height picture made from it by resizing it to cover that
    shape and cropping the centre (what fit_square does for a square)."""
    w, h = size
    s = max(width / w, height / h)
    return np.asarray(keypoints, dtype=float) * s - np.array([(w * s - width) / 2, (h * s - height) / 2])


def subject_loss_weights(
    subject, resolution: int, latent_size: int, flip: bool, background_weight: float
) -> torch.Tensor:
    """Per training row, in encode_images' order (originals, then mirrors), the loss weight of each latent
    pixel: 1 where the subject covers it, `background_weight` where nothing of it does, in between at its
    edge. The subject's masks are fitted to the square exactly as its images are."""
    masks = subject.masks
    if not masks or len(masks) != len(subject.images):
        raise LimnerError(
            f"subject {subject.name}: a masked loss needs one mask per reference image "
            f"({len(masks or [])} masks for {len(subject.images)} images); put masks/NAME.png beside each NAME.jpg "
            "(white where the subject is), or leave background_weight unset"
        )
    fitted = []
    for i, (mask, image) in enumerate(zip(masks, subject.images)):
        if mask.shape[:2] != image.shape[:2]:
            raise LimnerError(
                f"subject {subject.name}: mask {i} is {mask.shape[1]}x{mask.shape[0]}, its image "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        grey = np.repeat(mask.astype(np.uint8)[..., None] * 255, 3, axis=-1)
        fitted.append(fit_square(grey, resolution)[..., 0] / 255.0)
    rows = fitted + ([m[:, ::-1] for m in fitted] if flip else [])
    cover = torch.from_numpy(np.stack(rows).astype(np.float32))[:, None]
    # area pooling: a latent pixel half on the subject counts half
    cover = F.interpolate(cover, size=(latent_size, latent_size), mode="area")
    return background_weight + (1 - background_weight) * cover


def image_captions(subject, use: bool = True) -> list[str]:
    """Per reference image, the words that follow the subject in its training prompt ("" for none)."""
    if not (use and subject.captions):
        return [""] * len(subject.images)
    if len(subject.captions) != len(subject.images):
        raise LimnerError(f"subject {subject.name}: {len(subject.captions)} captions for {len(subject.images)} images")
    return list(subject.captions)


def with_caption(prompt: str, caption: str) -> str:
    """The training prompt of one reference image: the subject's prompt, then what else it shows."""
    return f"{prompt} {caption}".strip() if caption else prompt


@dataclass
class LatentCache:
    """Posterior mean and std of each training image (and of its mirror image when flipping is on):
    the VAE encoder runs once, not once per step."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling: float
    source: torch.Tensor  # index of the original image for each row

    def sample(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        eps = torch.randn(self.mean[idx].shape, generator=generator)
        return (self.mean[idx] + self.std[idx] * eps) * self.scaling


@torch.no_grad()
def sample_latents(vae, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A batch of pictures in [-1, 1] as the UNet's latents: one draw from the VAE's posterior, scaled."""
    posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return posterior.sample(generator) * float(vae.config.scaling_factor)


@torch.no_grad()
def encode_images(vae, images: list[np.ndarray], resolution: int, flip: bool = False, batch: int = 16) -> LatentCache:
    if not images:
        raise LimnerError("no training images: give at least one reference image of the subject")
    fitted = [fit_square(im, resolution) for im in images]
    rows, source = list(fitted), list(range(len(fitted)))
    if flip:
        rows += [im[:, ::-1].copy() for im in fitted]
        source += list(range(len(fitted)))
    means, stds = [], []
    device, dtype = vae.device, vae.dtype
    for i in range(0, len(rows), batch):
        d = vae.encode(to_unit_range(np.stack(rows[i : i + batch])).to(device, dtype)).latent_dist
        means.append(d.mean.float().cpu())
        stds.append(d.std.float().cpu())
    scaling = float(vae.config.scaling_factor)
    return LatentCache(torch.cat(means), torch.cat(stds), scaling, torch.tensor(source))
