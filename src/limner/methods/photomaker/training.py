"""PhotoMaker's training (Li et al., 2024, section 3.3): what learns, on what, against which loss.

Each sample is a picture of one person, its caption with the trigger written after the class word, and 1 to
`max_references` other pictures of that person (other context, pose, scale and clothes: the world's identity
stream, `limner.data.open_stream("world", pair="view", subjects="characters", clothes="vary")`, with further views
from `more_views`). Each reference's face crop (found by the face analysis, as at encode time) goes through the ID
encoder (v2: with the face's identity embedding from the same analysis); the class token, repeated once per
reference (v2: twice), takes one fused embedding each; the UNet (a LoRA on every
attention projection) denoises the picture from that. What trains: the LoRA, the image encoder's last layers, the
projections (v1) or the face perceiver (v2), and the fuse module.

    L = || eps - eps_theta(z_t, t, s*) ||^2,   inside the person's mask with probability 0.5 (the masked
                                               diffusion loss: the background of a training picture is not part
                                               of the identity)

With probability 0.1 a sample is unconditioned (empty caption, no ID image) for classifier-free guidance.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import nn

from limner.adapters.lora import add_named_lora, named_lora_state, remove_named_lora
from limner.data.sample import square_mask
from limner.errors import LimnerError
from limner.images import to_unit_range
from limner.methods.photomaker.id_encoder import pixels_of
from limner.methods.photomaker.prompts import stacked_token_ids
from limner.methods.photomaker.references import id_faces
from limner.methods.photomaker.weights import LORA_NAME, LORA_TARGETS
from limner.training import TrainingTask, noise_scheduler
from limner.training.conditioning import PromptEncoder
from limner.training.data import fit_square, sample_latents
from limner.training.losses import denoising_loss

MAX_SKIPPED_IN_A_ROW = 64  # data where faces are this rare is the wrong data (or the wrong face analysis)


def with_trigger(caption: str, class_noun: str, trigger: str) -> str | None:
    """The caption with the trigger after the first whole-word class noun ("a portrait of a woman img on the
    beach"), None where the caption does not name the class."""
    match = re.search(rf"\b{re.escape(class_noun)}\b", caption)
    if match is None:
        return None
    return f"{caption[: match.end()]} {trigger}{caption[match.end() :]}"


def class_of(sample) -> str | None:
    """The world stream's class word of a sample's person (its subject key: character:CLASS:...)."""
    parts = (sample.subject or "").split(":")
    return parts[1] if len(parts) > 2 and parts[0] == "character" else None


class IDBatches:
    """next_batch for the trainer: samples with 1 to `max_references` references each (the count drawn per
    sample), their face crops preprocessed for the ID encoder, captions with the trigger, the class token stacked
    once per reference. Unconditioned samples (probability `uncondition_prob`) have an empty caption and no ID."""

    def __init__(self, stream: Any, base, analysis, processor, cfg, batch_size: int, tokens_per_image: int = 1):
        self.stream, self.base, self.analysis, self.processor = stream, base, analysis, processor
        self.cfg, self.batch_size = cfg, batch_size
        self.tokens_per_image = tokens_per_image  # class-token copies a reference fills: v1 1, v2 2
        self.prompts = PromptEncoder(base.pipe, base.resolution)
        self.iterator = None  # made at the first batch: after the loop has put a resumed stream back where it was
        self.skipped: dict[str, int] = {}
        self.in_a_row = 0  # samples skipped since the last one kept

    def _skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1
        self.in_a_row += 1
        if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise LimnerError(
                f"PhotoMaker pretraining skipped {self.in_a_row} samples in a row ({why}); the data's pictures must "
                "show a person's face that the face analysis finds (--faces DIR for real photos)"
            )

    def _references(self, sample, k: int, count: int) -> list[np.ndarray]:
        refs = list(sample.references)
        more = getattr(self.stream, "more_views", None)
        if count > len(refs) and callable(more):
            refs += more(k, count - len(refs))[0]
        return refs[:count]

    def __call__(self, generator: torch.Generator) -> dict:
        if self.iterator is None:
            self.iterator = iter(self.stream)
        resolution, trigger = self.base.resolution, self.cfg.trigger
        images, ids, masks, crops, faces, rows, tokens = [], [], [], [], [], [], []
        while len(images) < self.batch_size:
            k = getattr(self.stream, "k", 0)
            sample = next(self.iterator)
            uncond = torch.rand(1, generator=generator).item() < self.cfg.uncondition_prob
            count = int(torch.randint(1, self.cfg.max_references + 1, (1,), generator=generator))
            noun = class_of(sample)
            caption = None if uncond or noun is None else with_trigger(sample.text, noun, trigger)
            if uncond:
                sample_ids, positions, found, embeddings = self.prompts.tokenize([""]), [], [], []
            else:
                if caption is None:
                    self._skip("caption names no class word")
                    continue
                refs = self._references(sample, k, count)
                found, embeddings, _ = id_faces(refs, [""] * len(refs), self.analysis, self.cfg.crop_scale, False)
                embeddings = [e for e in embeddings if e is not None]
                found = [c for c in found if c is not None]
                if not found:
                    self._skip("no face found in the references")
                    continue
                sample_ids, positions = self._stacked(caption, len(found) * self.tokens_per_image)
            self.in_a_row = 0
            b = len(images)
            images.append(fit_square(np.asarray(sample.image), resolution))
            ids.append(sample_ids)
            mask = sample.mask if sample.mask is not None else np.ones(np.asarray(sample.image).shape[:2], bool)
            masks.append(mask if mask.shape == (resolution,) * 2 else square_mask(mask, resolution))
            crops += found
            faces += embeddings
            rows += [b] * len(positions)
            tokens += positions
        return {
            "images": to_unit_range(np.stack(images)),
            "input_ids": torch.cat(ids),
            "pixels": pixels_of(self.processor, crops) if crops else None,
            "id_embeds": torch.stack(faces) if faces and self.tokens_per_image > 1 else None,
            "rows": torch.tensor(rows, dtype=torch.long),
            "tokens": torch.tensor(tokens, dtype=torch.long),
            "mask": torch.from_numpy(np.stack(masks))[:, None].float(),
        }

    def _stacked(self, caption: str, copies: int) -> tuple[torch.Tensor, list[int]]:
        """[1, encoders, L] ids with the class token stacked, and its positions (the same for every tokenizer)."""
        rows, positions = [], None
        for tokenizer in self.prompts.tokenizers:
            row, where = stacked_token_ids(tokenizer, caption, copies, self.cfg.trigger)
            if positions is not None and where != positions:
                raise LimnerError(
                    "the base's two tokenizers split the class word differently; PhotoMaker needs both alike"
                )
            rows.append(row)
            positions = where
        return torch.tensor([rows]), positions or []


class Pretraining(TrainingTask):
    """The trained parts (the UNet's LoRA; the ID encoder's last layers, projections and fuse module) and the
    masked denoising loss."""

    def __init__(self, base, id_encoder: nn.Module, cfg, train_cfg):
        self.base, self.id_encoder, self.cfg, self.train_cfg = base, id_encoder, cfg, train_cfg
        pipe = base.pipe
        self.unet = pipe.unet
        self.prompts = PromptEncoder(pipe, base.resolution)
        for m in (pipe.unet, pipe.vae, *self.prompts.text_encoders().values(), id_encoder):
            m.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # the new weights follow the run's seed
            torch.manual_seed(train_cfg.seed)
            self.lora = add_named_lora(self.unet, LORA_NAME, cfg.lora_rank, cfg.lora_rank, LORA_TARGETS)
        self.trained = id_encoder.trainable_layer_names(cfg.image_encoder_trainable_layers)
        self.encoder_params = [p for n, p in id_encoder.named_parameters() if _in(n, self.trained)]
        for p in [*self.lora, *self.encoder_params]:
            p.data = p.data.float()
            p.requires_grad_(True)
        self.scheduler = noise_scheduler(pipe)
        self.terms: list[dict[str, float]] = []

    def close(self) -> None:
        """The base as it was: no LoRA, nothing trainable."""
        remove_named_lora(self.unet, LORA_NAME)
        for m in (self.unet, self.id_encoder):
            m.requires_grad_(False)

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "id_encoder": self.id_encoder}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.base.pipe.vae, **self.prompts.text_encoders()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.lora, *self.encoder_params]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """unet.* (the LoRA, peft's names) and id_encoder.* (its trained parts)."""
        state = {f"unet.{k}": v.detach().clone() for k, v in named_lora_state(self.unet, LORA_NAME).items()}
        own = self.id_encoder.state_dict()
        return state | {f"id_encoder.{k}": own[k].detach().clone() for k in own if _in(k, self.trained)}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        unet = {k.partition(".")[2]: v for k, v in state.items() if k.startswith("unet.")}
        encoder = {k.partition(".")[2]: v for k, v in state.items() if k.startswith("id_encoder.")}
        set_peft_model_state_dict(self.unet, unet, adapter_name=LORA_NAME)
        self.id_encoder.load_state_dict(encoder, strict=False)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        pipe, device = self.base.pipe, self.base.device
        vae = pipe.vae
        with torch.no_grad():
            latents = sample_latents(vae, batch["images"], generator)
            text, unet_kwargs = self.prompts.encode(batch["input_ids"])
        text = text.float()
        if batch["pixels"] is not None:
            pixels = batch["pixels"].to(device, next(self.id_encoder.parameters()).dtype)
            rows, tokens = batch["rows"].to(device), batch["tokens"].to(device)
            id_embeds = batch.get("id_embeds")
            id_embeds = id_embeds.to(device) if id_embeds is not None else None
            cond = self.wrapped["id_encoder"](pixels, text, rows, tokens, id_embeds)
        else:  # every sample of the batch unconditioned
            cond = text
        masked = torch.rand(1, generator=generator).item() < self.cfg.mask_loss_prob
        loss = denoising_loss(
            self.wrapped["unet"],
            self.scheduler,
            latents,
            cond.to(self.unet.dtype),
            generator,
            noise_offset=self.train_cfg.noise_offset,
            min_snr_gamma=self.train_cfg.min_snr_gamma,
            mask=batch["mask"].to(device) if masked else None,
            **unet_kwargs,
        )
        self.terms.append({"denoise": float(loss.detach()), "masked": masked, "ids": int(len(batch["rows"]))})
        return loss


def _in(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)
