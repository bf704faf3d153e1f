"""The world build's training stages as `TrainingTask`s of the shared loop (`limner.training.train`).

Each task says what trains and what its loss is; each `*_batches` function returns the stage's
`next_batch(generator)`, drawing from the generator the loop seeds, checkpoints and restores. The
loop does the rest: schedule, EMA, checkpoints and exact resume, precision, progress and logs.

  ClipTask      contrastive CLIP (text + vision + text projection + logit scale) on world pairs
  VaeTask       AutoencoderKL: L1 + MSE reconstruction + a small KL term
  DenoiserTask  text-to-image UNet on the frozen CLIP text encoder: min-SNR denoising loss on cached
                latents, with conditioning dropout for classifier-free guidance
  ProbeTask     one probe: cross-entropy of each of its heads (see probes.py)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from limner.images import to_unit_range
from limner.training import TrainingTask, denoising_loss, drop_conditioning
from limner.world import stack
from limner.world.probes import ProbeSpec, probe_batch, probe_loss

Batches = Callable[[torch.Generator], dict]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class WholeModelTask(TrainingTask):
    """A task that trains every parameter of its one module: the checkpoint holds its whole state."""

    name: str

    def __init__(self, model: nn.Module):
        self.model = model

    def modules(self) -> dict[str, nn.Module]:
        return {self.name: self.model}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())  # buffers too (a probe's batch-norm statistics)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def forward(self, *args, **kwargs):
        """Through the accelerate-wrapped module, so that several processes would synchronise gradients."""
        return self.wrapped[self.name](*args, **kwargs)


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


class WorldClip(nn.Module):
    """The CLIP stage's models as one module (so accelerate prepares them together): text encoder, vision
    encoder, the text projection (CLIPTextModel has none) and the logit scale."""

    def __init__(self, tokenizer):
        super().__init__()
        self.text = stack.build_text_encoder(tokenizer)
        self.vision = stack.build_image_encoder()
        self.proj = nn.Linear(stack.TEXT_DIM, stack.TEXT_DIM, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, ids: torch.Tensor, pix: torch.Tensor) -> torch.Tensor:
        """Image-text logits [B images, B captions]."""
        txt = self.proj(self.text(ids).pooler_output)
        img = self.vision(pixel_values=pix).image_embeds
        with torch.autocast(pix.device.type, enabled=False):  # the similarities in fp32, even under mixed precision
            txt, img = F.normalize(txt.float(), dim=-1), F.normalize(img.float(), dim=-1)
            return self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.t()


class ClipTask(WholeModelTask):
    name = "clip"

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        device = _device(self.model)
        ids = batch["ids"].to(device)
        logits = self.forward(ids, batch["pix"].to(device))
        # identical captions in a batch are positives for each other, not negatives
        same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        return 0.5 * (_soft_cross_entropy(logits, target) + _soft_cross_entropy(logits.t(), target))


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * logits.log_softmax(1), 1).mean()


def clip_batches(images: np.ndarray, ids: torch.Tensor, batch: int) -> Batches:
    """Random (image, caption ids) pairs of the training set."""

    def next_batch(g: torch.Generator) -> dict:
        idx = torch.randint(len(ids), (batch,), generator=g)
        return {"pix": to_unit_range(images[idx.numpy()]), "ids": ids[idx]}

    return next_batch


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------


class VaeTask(WholeModelTask):
    name = "vae"

    def __init__(self, vae: nn.Module, kl_weight: float):
        super().__init__(vae)
        self.kl_weight = kl_weight

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        # encode and decode are not the module's forward, so they run on the module itself: the build
        # trains in one process
        x = batch["x"].to(_device(self.model))
        posterior = self.model.encode(x).latent_dist
        recon = self.model.decode(posterior.sample(generator=generator)).sample.float()
        return (recon - x).abs().mean() + F.mse_loss(recon, x) + self.kl_weight * posterior.kl().mean()


def image_batches(images: np.ndarray, batch: int) -> Batches:
    def next_batch(g: torch.Generator) -> dict:
        idx = torch.randint(len(images), (batch,), generator=g)
        return {"x": to_unit_range(images[idx.numpy()])}

    return next_batch


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------


def training_scheduler():
    from diffusers import DDPMScheduler

    # Stable Diffusion 1.x's training noise schedule
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class DenoiserTask(WholeModelTask):
    """The UNet's min-SNR denoising loss (epsilon prediction) on the frozen text encoder's states."""

    name = "unet"

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, min_snr_gamma: float):
        super().__init__(unet)
        self.text_encoder = text_encoder.requires_grad_(False)
        self.scheduler, self.min_snr_gamma = training_scheduler(), min_snr_gamma

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        device = _device(self.model)
        with torch.no_grad():
            cond = self.text_encoder(batch["ids"].to(device)).last_hidden_state
        return denoising_loss(
            self.wrapped[self.name],
            self.scheduler,
            batch["latents"].to(device),
            cond,
            generator,
            min_snr_gamma=self.min_snr_gamma,
        )


def latent_batches(
    cached: dict, scaling: float, ids: torch.Tensor, empty_ids: torch.Tensor, batch: int, cond_dropout: float
) -> Batches:
    """Latents drawn from each image's cached posterior (mean, std), scaled, and its caption's ids, the
    empty caption's with probability `cond_dropout`."""

    def next_batch(g: torch.Generator) -> dict:
        idx = torch.randint(len(ids), (batch,), generator=g)
        dropped = drop_conditioning(ids[idx], empty_ids, cond_dropout, g)
        mean, std = cached["mean"][idx].float(), cached["std"][idx].float()
        return {"latents": (mean + std * torch.randn(mean.shape, generator=g)) * scaling, "ids": dropped}

    return next_batch


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


class ProbeTask(WholeModelTask):
    name = "probe"

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return probe_loss(self.forward(batch["x"]), batch["labels"])


def probe_batches(
    spec: ProbeSpec, images: np.ndarray, labels: dict[str, np.ndarray], round_trips: np.ndarray | None, batch: int
) -> Batches:
    def next_batch(g: torch.Generator) -> dict:
        x, y = probe_batch(spec, images, labels, round_trips, batch, g)
        return {"x": x, "labels": y}

    return next_batch
