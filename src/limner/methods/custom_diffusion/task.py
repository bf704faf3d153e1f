"""Custom Diffusion's training: augmentation that rescales the references with matching prompt
prefixes and a mask of the valid region, and the task that trains attn2's projections and the modifier token."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from limner.methods.custom_diffusion.config import CustomDiffusionConfig
from limner.methods.custom_diffusion.formats import trained_projections
from limner.methods.textual_inversion import NewTokenRows
from limner.training import TrainingTask, denoising_loss, noise_scheduler
from limner.training.conditioning import PromptEncoder, concat, select
from limner.training.data import fit_square

SHRINK_PREFIXES = ("a far away", "very small")
ENLARGE_PREFIXES = ("zoomed in", "close up")

if TYPE_CHECKING:
    pass


def rescale(image: np.ndarray, resolution: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """(image, valid-region mask, prompt prefix) for one random rescale of a reference image."""
    im = fit_square(image, resolution)
    r = rng.random()
    if r < 1 / 3:  # shrink onto a blank canvas: only the pasted region counts in the loss
        size = max(8, int(resolution * rng.uniform(1 / 3, 0.9)))
        small = np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
        canvas = np.zeros_like(im)
        mask = np.zeros(im.shape[:2], bool)
        y, x = rng.integers(0, resolution - size + 1, 2)
        canvas[y : y + size, x : x + size] = small
        mask[y : y + size, x : x + size] = True
        return canvas, mask, str(rng.choice(SHRINK_PREFIXES))
    if r < 2 / 3:  # enlarge and crop
        size = int(resolution * rng.uniform(1.2, 1.4))
        big = np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
        y, x = rng.integers(0, size - resolution + 1, 2)
        return (
            big[y : y + resolution, x : x + resolution].copy(),
            np.ones(im.shape[:2], bool),
            str(rng.choice(ENLARGE_PREFIXES)),
        )
    return im, np.ones(im.shape[:2], bool), ""


def instance_prompt(prefix: str, token: str, class_noun: str) -> str:
    return f"{prefix} photo of a {token} {class_noun}".strip() if prefix else f"a photo of a {token} {class_noun}"


# --------------------------------------------------------------------------------------------


class CustomDiffusionTask(TrainingTask):
    def __init__(
        self, pipe, encoder: PromptEncoder, cfg: CustomDiffusionConfig, token_ids: dict[str, list[int]], reg_cond
    ):
        self.pipe, self.encoder, self.cfg, self.train_cfg, self.reg_cond = pipe, encoder, cfg, cfg.train, reg_cond
        self.noise = noise_scheduler(pipe)
        pipe.unet.requires_grad_(False)
        self.weights = {
            f"{name}.{proj}.{pname}": p for name, proj, pname, p in trained_projections(pipe.unet, cfg.mode)
        }
        for p in self.weights.values():
            p.requires_grad_(True)
        self.rows = NewTokenRows(encoder.text_encoders(), token_ids)

    def modules(self):
        return {"unet": self.pipe.unet} | self.encoder.text_encoders()

    def trainable_parameters(self):
        return list(self.weights.values()) + self.rows.parameters()

    def loss(self, batch, generator):
        unet, tc = self.wrapped["unet"], self.train_cfg
        cond, kw = self.encoder.encode(batch["input_ids"], self.wrapped)
        latents, mask = batch["latents"].to(cond), batch["mask"]
        n = latents.shape[0]
        if "reg_latents" in batch:
            cond, kw = concat([(cond, kw), select(*self.reg_cond, batch["reg_idx"])])
            latents = torch.cat([latents, batch["reg_latents"].to(cond)])
            mask = torch.cat([mask, torch.ones((latents.shape[0] - n, *mask.shape[1:]), dtype=mask.dtype)])
        per = denoising_loss(
            unet,
            self.noise,
            latents,
            cond,
            generator,
            tc.noise_offset,
            tc.min_snr_gamma,
            mask=mask,
            reduction="none",
            **kw,
        )
        loss = per[:n].mean()
        if per.shape[0] > n:
            loss = loss + self.cfg.prior_loss_weight * per[n:].mean()
        return loss

    def before_clipping(self):
        self.rows.zero_others_gradients()

    def after_optimizer_step(self):
        self.rows.restore_others()

    def trainable_state(self):
        return {k: v.detach().float() for k, v in self.weights.items()} | {
            f"tokens.{k}": v for k, v in self.rows.vectors().items()
        }

    def load_trainable_state(self, state):
        with torch.no_grad():
            for k, p in self.weights.items():
                p.copy_(state[k].to(p))
        self.rows.load({k.removeprefix("tokens."): v for k, v in state.items() if k.startswith("tokens.")})
