"""InstantID's pretraining (Wang et al., 2024, section 3.4): the UNet, VAE and text encoder frozen; the Image
Adapter (the Resampler and every attn2's to_k_ip / to_v_ip) and the IdentityNet learn the plain noise-prediction
MSE together:

    L = E || eps - eps_theta(z_t, t, C, F_id, I_kps) ||^2

C the caption, F_id the face embedding's 16 ID tokens (through the decoupled image attention, and as the
IdentityNet's only cross-attention context), I_kps the target's 5 face keypoints drawn on black (the IdentityNet's
condition image). The paper drops neither the text nor the image.

A sample pairs a target picture with another picture of the same person (the world stream's pair="view",
subjects="characters", clothes="vary": another pose, place, size and shirt), so the ID embedding carries who it
is and the keypoints where the face goes, and neither copies the target. The face embedding is read from that
reference by the face analyser, as encoding will; the target's keypoints come from the renderer on the world and
from the face analyser on other data. Samples whose reference shows no face are skipped and counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from limner.adapters import image_projection, ip_attention_parameters
from limner.adapters.controlnet import (
    ControlSignal,
    condition_tensor,
    controlnet_from_unet,
    draw_kps,
    image_token_context,
    install_controlnet,
)
from limner.encoders.faces import FaceAnalysis, identity_input, largest_face
from limner.errors import LimnerError
from limner.images import to_unit_range
from limner.methods.ip_adapter import attach, detach, load_projection
from limner.training import TrainConfig, TrainingTask, noise_scheduler
from limner.training.data import fit_points, fit_square, sample_latents
from limner.training.losses import denoising_loss

if TYPE_CHECKING:
    from limner.models.loading import Base


def id_projection(embedding_dim: int, cross_attention_dim: int, dim: int, num_tokens: int) -> nn.Module:
    """InstantID's Image Adapter projection: the Resampler (depth 4, heads of 64, feed-forward x4) reading the face
    embedding as one token and giving `num_tokens` ID tokens."""
    return image_projection("plus", embedding_dim, cross_attention_dim, num_tokens=num_tokens, dim=dim)


class IdentityPretraining(TrainingTask):
    """Frozen base; the Resampler, to_k_ip / to_v_ip and the IdentityNet train."""

    def __init__(
        self,
        base: Base,
        embedding_dim: int,
        train_cfg: TrainConfig,
        *,
        dim: int,
        num_tokens: int,
        weights: dict | None = None,
        controlnet: nn.Module | None = None,
    ):
        from limner.training.conditioning import PromptEncoder

        self.base, self.train_cfg = base, train_cfg
        pipe = base.pipe
        self.unet = pipe.unet
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if m is not None:
                m.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # the new weights follow the run's seed
            torch.manual_seed(train_cfg.seed)
            if weights is None:
                projection = id_projection(embedding_dim, int(self.unet.config.cross_attention_dim), dim, num_tokens)
            else:
                projection = load_projection(weights, "the adapter")
            self.controlnet = controlnet if controlnet is not None else controlnet_from_unet(self.unet)
        self.controlnet = self.controlnet.to(base.device).float().train()
        attach(self.unet, [projection.to(base.device, torch.float32)], None if weights is None else [weights])
        self.signal = ControlSignal(
            self.controlnet, torch.zeros(1, 3, 8, 8), scale=1.0, context=image_token_context(self.unet)
        )
        self.remove_signal = install_controlnet(self.unet, self.signal)
        self.params = [*self.unet.encoder_hid_proj.parameters(), *ip_attention_parameters(self.unet)]
        for p in self.params:
            p.data = p.data.float()  # trained in fp32 whatever the base's dtype
            p.requires_grad_(True)
        self.controlnet.requires_grad_(True)
        self.params += list(self.controlnet.parameters())
        self.prompts = PromptEncoder(pipe, base.resolution)
        self.scheduler = noise_scheduler(pipe)

    def close(self) -> None:
        """Takes the adapter and the IdentityNet out of the base's UNet again."""
        self.remove_signal()
        detach(self.unet)
        self.unet.requires_grad_(False)

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "controlnet": self.controlnet}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.base.pipe.vae, **self.prompts.text_encoders()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.params

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"unet.{n}": p.detach().clone() for n, p in self.unet.named_parameters() if p.requires_grad}
        return state | {f"controlnet.{n}": p.detach().clone() for n, p in self.controlnet.named_parameters()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        named = {f"unet.{n}": p for n, p in self.unet.named_parameters()}
        named |= {f"controlnet.{n}": p for n, p in self.controlnet.named_parameters()}
        with torch.no_grad():
            for name, value in state.items():
                named[name].copy_(value)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        vae = self.base.pipe.vae
        # the ControlNet runs inside the UNet's call (a forward pre-hook): through accelerate's wrapper if any
        self.signal.controlnet = self.wrapped.get("controlnet", self.controlnet)
        self.signal.image = batch["kps"].to(self.base.device)
        with torch.no_grad():
            latents = sample_latents(vae, batch["images"], generator)
            cond, kwargs = self.prompts.encode_frozen(batch["prompts"])
        faces = batch["faces"].to(self.base.device).unsqueeze(1)  # [B, 1 token, d]
        added = kwargs.get("added_cond_kwargs", {}) | {"image_embeds": [faces.unsqueeze(1)]}  # [B, 1 image, 1, d]
        return denoising_loss(
            self.wrapped["unet"],
            self.scheduler,
            latents,
            cond,
            generator,
            noise_offset=self.train_cfg.noise_offset,
            min_snr_gamma=self.train_cfg.min_snr_gamma,
            added_cond_kwargs=added,
        )


def target_keypoints(sample: Any, image: np.ndarray, faces: FaceAnalysis) -> np.ndarray | None:
    """The target's 5 face keypoints in the fitted picture's pixels: the renderer's where the stream gives them
    (moved as fit_square moved the picture), else the face analyser's on the fitted picture (None: no face)."""
    given = getattr(sample, "face_keypoints", None)
    if given is not None:
        h, w = np.asarray(sample.image).shape[:2]
        return fit_points(given, (w, h), image.shape[1], image.shape[0]).astype(np.float32)
    face = largest_face(faces.analyse([image])[0])
    return None if face is None else face.keypoints


def batches(
    stream: Any,
    base: Base,
    faces: FaceAnalysis,
    batch_size: int,
    kps_style: tuple[int | None, int | None],
    embedding_norm: float = 1.0,
):
    """next_batch for the trainer: per sample the fitted target, its caption, its keypoints drawn (the IdentityNet's
    condition) and the face embedding of its reference (the target itself where the sample has no other view),
    given the norm `embedding_norm` (see limner.methods.instantid.id_embedding).
    Samples without a face in the reference or the target are skipped and counted in stream.skipped."""
    iterator = None  # made at the first batch: after the loop has put a resumed stream back where it was
    skipped = getattr(stream, "skipped", None)

    def skip(reason: str) -> None:
        if isinstance(skipped, dict):
            skipped[reason] = skipped.get(reason, 0) + 1

    def next_sample():
        nonlocal iterator
        if iterator is None:
            iterator = iter(stream)
        for attempt in range(2):
            try:
                return next(iterator)
            except StopIteration:
                if attempt:
                    break
                iterator = iter(stream)
        raise LimnerError("the pretraining data has no usable sample (no picture with a face)")

    def next_batch(generator: torch.Generator) -> dict:
        images, prompts, kps, embeddings = [], [], [], []
        tries = 0
        while len(images) < batch_size:
            tries += 1
            if tries > 50 * batch_size:
                raise LimnerError(
                    "the pretraining data has almost no picture with a face; InstantID learns from faces"
                )
            sample = next_sample()
            image = fit_square(np.asarray(sample.image), base.resolution)
            reference = sample.references[0] if getattr(sample, "references", None) else sample.image
            face = largest_face(faces.analyse([np.asarray(reference)])[0])
            if face is None:
                skip("no face in the reference")
                continue
            points = target_keypoints(sample, image, faces)
            if points is None:
                skip("no face in the target")
                continue
            images.append(image)
            prompts.append(sample.text)
            kps.append(draw_kps(base.resolution, base.resolution, points, *kps_style))
            embeddings.append(identity_input(face, embedding_norm))
        return {
            "images": to_unit_range(np.stack(images)),
            "prompts": prompts,
            "kps": condition_tensor(kps),
            "faces": torch.stack(embeddings),
        }

    return next_batch


__all__ = ["IdentityPretraining", "batches", "id_projection", "target_keypoints"]
