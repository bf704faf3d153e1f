"""The denoising loss every tuning method and the world build share, with its training-time noise
scheduler, the min-SNR weighting, and conditioning dropout (for classifier-free guidance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def noise_scheduler(pipe):
    """The training-time (DDPM) view of the pipeline's noise schedule. The pipeline's own scheduler is
    an inference sampler whose add_noise only knows the timesteps of its last sampling run."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR per sample (over SNR + 1 for v-prediction): the min-SNR loss weighting."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    denominator = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    return torch.clamp(snr, max=gamma) / denominator


def denoising_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    generator: torch.Generator,
    noise_offset: float = 0.0,
    min_snr_gamma: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    **unet_kwargs,
) -> torch.Tensor:
    """Epsilon (or v) prediction MSE at random timesteps, with optional noise offset, min-SNR weighting
    and a spatial mask (1 where the loss counts). reduction='none' gives one value per sample."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator).to(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, cond, **unet_kwargs).sample.float()
    target = (
        noise.float()
        if scheduler.config.prediction_type == "epsilon"
        else scheduler.get_velocity(latents, noise, t).float()
    )
    err = F.mse_loss(pred, target, reduction="none")
    if mask is not None:
        m = F.interpolate(mask.float(), size=err.shape[-2:], mode="nearest").to(err)
        per_sample = (err * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * err.shape[1]).clamp(min=1)
    else:
        per_sample = err.mean(dim=(1, 2, 3))
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, t, min_snr_gamma)
    return per_sample if reduction == "none" else per_sample.mean()


def drop_conditioning(cond: torch.Tensor, empty: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """`cond` with each row replaced by `empty` with probability `p`, so the model also learns the
    unconditional prediction that classifier-free guidance needs. `cond` is [B, ...] (token ids, text or
    image embeddings) and `empty` one row of the same shape (the empty caption's ids, zeros), with or
    without the leading 1. One draw per row from `generator` (on the CPU, so the draws are the same on
    every device); `p` 0 draws nothing."""
    if not p:
        return cond
    drop = torch.rand(cond.shape[0], generator=generator) < p
    keep = (~drop).to(cond.device).view(-1, *[1] * (cond.dim() - 1))
    return torch.where(keep, cond, empty.to(cond).expand_as(cond))
