"""FastComposer's training (Xiao et al., 2023, section 4): what learns, on what, against which losses.

Each sample is a scene of 1 to 4 subjects, its caption with the image token after each subject's noun, each
subject's crop (background replaced by noise) and mask. The image encoder reads every crop (its last 2 layers
train); the fuse MLP writes each subject's embedding into the text encoder's output at its noun; the UNet (its
LoRA here) denoises from that. The loss:

    L = L_denoise + lambda * L_localization,   lambda = 1e-3

L_denoise is the noise-prediction MSE, with probability 0.5 only inside the subjects' masks (the masked loss, so the
background of a training image is not learned as part of its subjects; limner's masked MSE is the mean over the
mask's pixels, where the official code zeroes the error outside the mask and averages over the whole picture, so
its masked steps weigh less the smaller the subjects: here a masked step counts as much as an unmasked one, and the
1e-3 weight of L_localization sits against a larger L_denoise on those steps). L_localization is the balanced L1 on the
cross-attention maps of the middle 5 cross-attention blocks: for each subject's noun token, its mean attention on
the background minus its mean attention inside the subject's mask (resized to each map), averaged over the subjects
of a sample, the heads, the samples and the blocks. It keeps each subject's token attending to its own region,
which is what stops two subjects' identities from blending. With probability 0.1 a sample is unconditioned (empty
caption, no subject), for classifier-free guidance; each subject is kept with probability 0.9 (the official
object_appear_prob), a dropped one left as a plain noun.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from limner.adapters import FuseMLP
from limner.adapters.attention_maps import capture_cross_attention, middle_cross_attention_blocks
from limner.adapters.lora import add_named_lora, named_lora_state, remove_named_lora
from limner.errors import LimnerError
from limner.images import to_unit_range
from limner.methods.fastcomposer.prompts import tokenize_with_triggers, with_triggers
from limner.methods.fastcomposer.weights import LORA_NAME
from limner.training import TrainingTask, noise_scheduler
from limner.training.data import fit_square, sample_latents
from limner.training.losses import denoising_loss

# the UNet's LoRA: every attention projection and feed-forward layer of its transformer blocks
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def balanced_l1(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official BalancedL1Loss: mean attention outside the mask minus mean attention inside it, over the last
    dimension (pixels). attention and mask broadcast to [..., pixels]."""
    background = 1 - mask
    outside = (attention * background).sum(-1) / (background.sum(-1) + 1e-5)
    inside = (attention * mask).sum(-1) / (mask.sum(-1) + 1e-5)
    return outside - inside


def localization_loss(
    maps: dict[str, torch.Tensor], masks: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, batch: int
) -> torch.Tensor:
    """The localization loss over captured cross-attention maps ({layer: [batch x heads, pixels, text tokens]}).

    masks: [subjects, H, W] (1 inside), one per subject of the batch; rows / tokens: each subject's sample and its
    noun's token position. Per layer, each subject's balanced L1 averaged over heads, summed over its sample's
    subjects and divided by their count; the mean over samples (one without subjects counts 0), then over layers."""
    if not maps:
        raise LimnerError("no cross-attention maps were captured: the localization blocks hold no attn2 layer")
    masks = masks.float()
    counts = torch.zeros(batch, device=masks.device).index_add_(0, rows, torch.ones_like(rows, dtype=torch.float))
    total = masks.new_zeros(())
    for probs in maps.values():
        heads, pixels = probs.shape[0] // batch, probs.shape[1]
        side = math.isqrt(pixels)
        resized = F.interpolate(masks[:, None], size=(side, side), mode="bilinear", antialias=True)
        attention = probs.view(batch, heads, pixels, -1)[rows, :, :, tokens]  # [subjects, heads, pixels]
        per_subject = balanced_l1(attention.float(), resized.view(len(rows), 1, pixels)).mean(1)
        per_sample = torch.zeros(batch, device=masks.device).index_add(0, rows, per_subject)
        total = total + (per_sample / (counts + 1e-5)).mean()
    return total / len(maps)


def fuse_subjects(fuse: nn.Module, text: torch.Tensor, subjects: torch.Tensor, rows, tokens) -> torch.Tensor:
    """text [B, L, d] with position (rows[k], tokens[k]) replaced by the fusion of that token and subject k's
    embedding (subjects [K, d_image]); the fuse module is called on the pairs (through its forward, so a wrapped
    module's gradients are synchronised)."""
    fused = fuse(text[rows, tokens], subjects)
    return text.index_put((rows, tokens), fused.to(text.dtype))


class SubjectBatches:
    """next_batch for the trainer: samples of a multi-subject stream with the paper's drops applied, tokenized with
    the trigger after each kept subject's noun, their crops preprocessed for the image encoder."""

    def __init__(self, stream: Any, base, processor, cfg, batch_size: int):
        self.stream, self.base, self.processor, self.cfg, self.batch_size = stream, base, processor, cfg, batch_size
        self.iterator = None  # made at the first batch: after the loop has put a resumed stream back where it was

    def __call__(self, generator: torch.Generator) -> dict:
        if self.iterator is None:
            self.iterator = iter(self.stream)
        tokenizer, resolution, trigger = self.base.pipe.tokenizer, self.base.resolution, self.cfg.trigger
        images, ids, masks, crops, rows, tokens, subject_masks = [], [], [], [], [], [], []
        for b in range(self.batch_size):
            sample = next(self.iterator)
            uncond = torch.rand(1, generator=generator).item() < self.cfg.uncondition_prob
            kept = [] if uncond else [k for k in range(len(sample.masks)) if self._appears(generator)]
            kept = kept[: self.cfg.max_subjects]
            text = "" if uncond else with_triggers(sample.text, [sample.noun_ends[k] for k in kept], trigger)
            row_ids, positions = tokenize_with_triggers(tokenizer, text, trigger)
            images.append(fit_square(np.asarray(sample.image), resolution))
            ids.append(row_ids)
            scene_masks = [_fit_mask(sample.masks[k], resolution) for k in kept]
            masks.append(np.any(scene_masks, axis=0) if scene_masks else np.zeros((resolution,) * 2, bool))
            for k, position in zip(kept, positions):
                crops.append(sample.references[k])
                subject_masks.append(_fit_mask(sample.masks[k], resolution))
                rows.append(b)
                tokens.append(position)
        pixels = self.processor(crops) if crops else None
        return {
            "images": to_unit_range(np.stack(images)),
            "input_ids": torch.tensor(ids),
            "pixels": pixels,
            "rows": torch.tensor(rows, dtype=torch.long),
            "tokens": torch.tensor(tokens, dtype=torch.long),
            "subject_masks": torch.from_numpy(np.stack(subject_masks)) if subject_masks else None,
            "mask": torch.from_numpy(np.stack(masks))[:, None].float(),
        }

    def _appears(self, generator: torch.Generator) -> bool:
        return torch.rand(1, generator=generator).item() < self.cfg.object_appear_prob


def _fit_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    from limner.data.sample import square_mask

    return mask if mask.shape == (resolution, resolution) else square_mask(mask, resolution)


class Pretraining(TrainingTask):
    """The trained parts (the UNet's LoRA, the fuse MLP, the image encoder's last layers) and the paper's loss.
    `terms` keeps each step's denoising and localization losses (the trainer logs their weighted sum)."""

    def __init__(self, base, encoder, cfg, train_cfg):
        self.base, self.encoder, self.cfg, self.train_cfg = base, encoder, cfg, train_cfg
        pipe = base.pipe
        self.unet = pipe.unet
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, encoder.model):
            m.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # the new weights follow the run's seed
            torch.manual_seed(train_cfg.seed)
            self.lora = add_named_lora(self.unet, LORA_NAME, cfg.lora_rank, cfg.lora_rank, LORA_TARGETS)
            width = int(pipe.text_encoder.config.hidden_size)
            self.fuse = FuseMLP(width, int(encoder.model.config.projection_dim)).to(base.device)
        self.layers = trainable_layer_names(encoder.model, cfg.image_encoder_trainable_layers)
        self.encoder_params = [p for n, p in encoder.model.named_parameters() if _in(n, self.layers)]
        for p in [*self.lora, *self.fuse.parameters(), *self.encoder_params]:
            p.data = p.data.float()
            p.requires_grad_(True)
        self.blocks = middle_cross_attention_blocks(self.unet, cfg.localization_blocks)
        self.capture = capture_cross_attention(self.unet, self.blocks)
        self.scheduler = noise_scheduler(pipe)
        self.terms: list[dict[str, float]] = []

    def close(self) -> None:
        """The base as it was: no capturing processors, no LoRA, nothing trainable."""
        self.capture.release()
        remove_named_lora(self.unet, LORA_NAME)
        for m in (self.unet, self.encoder.model):
            m.requires_grad_(False)

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "fuse": self.fuse, "image_encoder": self.encoder.model}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.base.pipe.vae, "text_encoder": self.base.pipe.text_encoder}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.lora, *self.fuse.parameters(), *self.encoder_params]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The official prefixes: unet.* (LoRA), postfuse_module.*, image_encoder.* (the trained layers)."""
        state = {f"unet.{k}": v.detach().clone() for k, v in named_lora_state(self.unet, LORA_NAME).items()}
        state |= {f"postfuse_module.{k}": v.detach().clone() for k, v in self.fuse.state_dict().items()}
        own = self.encoder.model.state_dict()
        state |= {f"image_encoder.{k}": own[k].detach().clone() for k in own if _in(k, self.layers)}
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        parts: dict[str, dict] = {"unet": {}, "postfuse_module": {}, "image_encoder": {}}
        for key, value in state.items():
            part, _, rest = key.partition(".")
            parts[part][rest] = value
        set_peft_model_state_dict(self.unet, parts["unet"], adapter_name=LORA_NAME)
        self.fuse.load_state_dict(parts["postfuse_module"])
        self.encoder.model.load_state_dict(parts["image_encoder"], strict=False)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        pipe, device = self.base.pipe, self.base.device
        vae, text_encoder = pipe.vae, pipe.text_encoder
        with torch.no_grad():
            latents = sample_latents(vae, batch["images"], generator)
            text = text_encoder(batch["input_ids"].to(device))[0].float()
        rows, tokens = batch["rows"].to(device), batch["tokens"].to(device)
        if batch["pixels"] is not None:
            pixels = batch["pixels"].to(device, self.encoder.dtype)
            subjects = self.wrapped["image_encoder"](pixel_values=pixels).image_embeds
            cond = fuse_subjects(self.wrapped["fuse"], text, subjects.float(), rows, tokens)
        else:  # every sample of the batch unconditioned
            cond = text
        masked = torch.rand(1, generator=generator).item() < self.cfg.mask_loss_prob
        self.capture.maps.clear()
        denoise = denoising_loss(
            self.wrapped["unet"],
            self.scheduler,
            latents,
            cond.to(self.unet.dtype),
            generator,
            noise_offset=self.train_cfg.noise_offset,
            min_snr_gamma=self.train_cfg.min_snr_gamma,
            mask=batch["mask"].to(device) if masked else None,
        )
        maps = self.capture.take()
        loss = denoise
        terms = {"denoise": float(denoise.detach()), "masked": masked}
        if len(rows) and self.cfg.localization_weight:
            localization = localization_loss(maps, batch["subject_masks"].to(device), rows, tokens, len(latents))
            loss = loss + self.cfg.localization_weight * localization
            terms["localization"] = float(localization.detach())
        self.terms.append(terms)
        return loss


def trainable_layer_names(model: nn.Module, n: int) -> list[str]:
    """The state-dict prefixes of the image encoder's last `n` transformer layers (the paper trains 2)."""
    layers = model.vision_model.encoder.layers
    if not 0 <= n <= len(layers):
        raise LimnerError(f"image_encoder_trainable_layers={n}: the image encoder has {len(layers)} layers")
    return [f"vision_model.encoder.layers.{i}." for i in range(len(layers) - n, len(layers))]


def _in(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)
