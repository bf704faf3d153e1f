"""StoryMaker's training (Zhou et al., 2024, section 3): what learns, on what, against which losses.

Trained: the projection (limner.methods.storymaker.projection), the image keys and values of every
cross-attention (decoupled attention, as IP-Adapter) and a LoRA on every attention's q, k, v and out; the UNet,
VAE, text encoder, image encoder and face analyser stay frozen. Each sample: a target picture, its caption, and
per character a reference (another view, same clothes) read as at use time (largest face, its embedding and
aligned crop, the character cut out on white), and the character's mask in the target. The loss:

    L = MSE(eps, eps_hat) * (1 + 5 * M)  +  0.1 * L_attn

M is the union of the characters' masks (the official mask_loss_weight 5: errors on the characters count six
times). L_attn is the cross-attention map loss on the *image* attention: in each decoupled attention layer the
attention probabilities of a character's 20 tokens are summed (heads averaged), averaged over the layers, and
compared by MSE with that character's mask; the background's 20 tokens against the background (1 - M). The
official code reads the layers below the full latent resolution; the world's UNet has cross-attention only there,
so all of its layers count. It binds each character's tokens to its own region, which is what keeps two
characters from blending. Drops (official): text 0.2, image 0.05, both 0.05 (a dropped image is zero embedding
and zero pixels, as the official script), and inside the projection each character's face tokens and body
tokens 0.1 each.

Pose decoupling (`pose_controlnet`): a frozen OpenPose ControlNet reads the target's skeleton (its characters' body
keypoints drawn by limner.adapters.controlnet.draw_pose) and the caption, and adds its residuals to the UNet's
every call, so where the characters stand comes from the skeleton and the image tokens need not carry the pose of
their reference; at generation a skeleton is optional.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from limner.adapters import install_ip_attention, ip_attention_parameters, remove_ip_attention, with_image_tokens
from limner.adapters.attention_maps import middle_cross_attention_blocks
from limner.adapters.controlnet import ControlSignal, condition_tensor, draw_pose, install_controlnet
from limner.adapters.lora import remove_named_lora
from limner.data.sample import square_mask
from limner.images import to_unit_range
from limner.methods.storymaker.characters import character_pictures, squeezed
from limner.methods.storymaker.projection import CHARACTER_TOKENS, StoryMakerProjection
from limner.methods.storymaker.weights import LORA_NAME, add_lora, ip_entries, lora_official_state, lora_peft_state
from limner.training import TrainingTask, noise_scheduler
from limner.training.data import fit_points, fit_square, sample_latents


class StoryBatches:
    """next_batch for the trainer: a batch of samples of one kind (one or two characters), each character read
    from its reference by the face analyser (a reference where no face is found is skipped and counted)."""

    def __init__(self, stream: Any, base, analyser, encoder_size: int, batch_size: int, pose_side: int | None = None):
        self.stream, self.base, self.analyser = stream, base, analyser
        self.size, self.batch_size, self.pose_side = encoder_size, batch_size, pose_side
        self.iterator = None
        self.skipped = 0

    def _samples(self) -> list:
        """The next batch's samples: one of the stream's batches where it draws them (`next_batch`: one kind, and a
        sample dropped for want of a face cannot shift where the next batch starts), else `batch_size` samples of
        the kind of the first."""
        if callable(getattr(self.stream, "next_batch", None)):
            return self.stream.next_batch()
        if self.iterator is None:  # made at the first batch: after a resumed stream is put back where it was
            self.iterator = iter(self.stream)
        samples = [next(self.iterator)]
        while len(samples) < self.batch_size:
            sample = next(self.iterator)
            if len(sample.references) == len(samples[0].references):
                samples.append(sample)
        return samples

    def __call__(self, generator: torch.Generator) -> dict:
        from limner.errors import LimnerError

        resolution = self.base.resolution
        images, prompts, masks, ids, crops, cutouts, places, skeletons = [], [], [], [], [], [], [], []
        while not images:  # a batch whose every reference shows no face is drawn again
            for sample in self._samples():
                names = [f"reference of {s}" for s in sample.subjects]
                try:
                    chars = character_pictures(sample.references, self.analyser, names)
                except LimnerError:
                    self.skipped += 1  # the batch is one sample smaller
                    continue
                images.append(fit_square(np.asarray(sample.image), resolution))
                prompts.append(sample.text)
                if self.pose_side:
                    skeletons.append(_skeleton_picture(sample, self.pose_side))
                masks.append(np.stack([_fit(m, resolution) for m in sample.masks]))
                for place, c in enumerate(chars):
                    ids.append(c.id_embed)
                    crops.append(c.face_crop)
                    cutouts.append(c.cutout)
                    places.append(place)
        return {
            "images": to_unit_range(np.stack(images)),
            "prompts": prompts,
            "masks": torch.from_numpy(np.stack(masks)).float(),  # [B, n, H, W]
            "ids": torch.from_numpy(np.stack(ids)).float(),  # [B * n, d_id]
            "faces": squeezed(crops, self.size),
            "bodies": squeezed(cutouts, self.size),
            "places": torch.tensor(places, dtype=torch.long),
        } | ({"poses": condition_tensor(skeletons)} if self.pose_side else {})


def _fit(mask: np.ndarray, resolution: int) -> np.ndarray:
    return mask if mask.shape == (resolution, resolution) else square_mask(mask, resolution)


def _skeleton_picture(sample: Any, side: int) -> np.ndarray:
    """The target's characters' skeletons as fitted with the target, drawn `side` pixels wide (the pose ControlNet's
    condition image)."""
    from limner.errors import LimnerError

    if getattr(sample, "poses", None) is None:
        raise LimnerError("pose_controlnet needs each sample's body keypoints; this data gives none (the world's do)")
    h, w = np.asarray(sample.image).shape[:2]
    return draw_pose(side, side, [fit_points(p, (w, h), side, side) for p in sample.poses])


class ImageAttentionCapture:
    """Keeps the image attention probabilities of the decoupled attention layers of some blocks: diffusers'
    classic IP processor computes them with `attn.get_attention_scores` (the text's first, then the image's),
    which is wrapped on those layers; `release` unwraps them."""

    def __init__(self, unet: nn.Module, blocks: list[str]):
        self.maps: dict[str, list[torch.Tensor]] = {}
        self.layers = []
        for name, module in unet.named_modules():
            if name.endswith("attn2") and name.split(".attentions")[0] in blocks:
                self.layers.append(module)
                self.maps[name] = []
                module.get_attention_scores = self._wrap(module.get_attention_scores, self.maps[name])

    @staticmethod
    def _wrap(scores, store: list):
        def get_attention_scores(query, key, attention_mask=None):
            probs = scores(query, key, attention_mask)
            store.append(probs)
            return probs

        return get_attention_scores

    def take(self) -> dict[str, torch.Tensor]:
        """{layer: [B * heads, pixels, image tokens]}: each layer's last call (the image attention)."""
        out = {name: calls[-1] for name, calls in self.maps.items() if calls}
        for calls in self.maps.values():
            calls.clear()
        return out

    def release(self) -> None:
        for module in self.layers:
            del module.get_attention_scores  # the class's method again
        self.maps.clear()


def attention_map_loss(
    maps: dict[str, torch.Tensor], heads: dict[str, int], masks: torch.Tensor, batch: int
) -> torch.Tensor:
    """The official cross-attention map loss. maps: {layer: [B * heads, pixels, (1 + n) * 20]}; masks [B, n, H, W].
    Per layer the heads' mean, each token group's summed probability, resized to the largest map; averaged over
    layers; MSE of each character's map against its mask and of the background's against 1 - union, summed and
    divided by n."""
    n = masks.shape[1]
    side = max(int(round(p.shape[1] ** 0.5)) for p in maps.values())
    groups = None
    for name, probs in maps.items():
        pixels, tokens = probs.shape[1], probs.shape[2]
        s = int(round(pixels**0.5))
        mean = probs.float().view(batch, heads[name], pixels, tokens).mean(1)  # [B, pixels, tokens]
        summed = mean.view(batch, pixels, 1 + n, CHARACTER_TOKENS).sum(-1)  # [B, pixels, 1 + n]
        grid = summed.permute(0, 2, 1).reshape(batch, 1 + n, s, s)
        if s != side:
            grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
        groups = grid if groups is None else groups + grid
    groups = groups / len(maps)
    target = F.interpolate(masks.float(), size=(side, side), mode="bilinear", antialias=True)
    background = 1 - target.sum(1, keepdim=True).clamp(0, 1)
    loss = F.mse_loss(groups[:, :1], background)
    for k in range(n):
        loss = loss + F.mse_loss(groups[:, 1 + k], target[:, k])
    return loss / n


class Pretraining(TrainingTask):
    """The trained parts and the paper's losses (see the module docstring). `terms` keeps each step's
    denoising and attention-map losses."""

    def __init__(self, base, encoder, shape, cfg, train_cfg, pose_controlnet: nn.Module | None = None):
        from diffusers.models.attention_processor import AttnProcessor

        from limner.training.conditioning import PromptEncoder

        self.base, self.encoder, self.cfg, self.train_cfg = base, encoder, cfg, train_cfg
        pipe = base.pipe
        self.unet = pipe.unet
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, encoder.model):
            m.requires_grad_(False)
        # the classic processor, whose get_attention_scores the attention-map loss reads, only on the layers it reads
        # (the middle blocks' cross-attention); the rest keep theirs (SDPA), which never holds a whole attention
        # matrix: at SDXL's size the classic one on every self-attention would not fit in memory
        self.blocks = middle_cross_attention_blocks(self.unet, 5)
        self.processors = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(
            {name: AttnProcessor() if self._read(name) else p for name, p in self.processors.items()}
        )
        with torch.random.fork_rng(devices=[]):  # the new weights follow the run's seed
            torch.manual_seed(train_cfg.seed)
            self.lora = add_lora(self.unet, cfg.lora_rank)
            # tokens are handed over with the text (with_image_tokens), so the count is only diffusers' bookkeeping
            install_ip_attention(self.unet, num_tokens=3 * CHARACTER_TOKENS)
            self.projection = StoryMakerProjection(shape).to(base.device)
        self.ip_params = ip_attention_parameters(self.unet)
        for p in [*self.lora, *self.ip_params, *self.projection.parameters()]:
            p.data = p.data.float()
            p.requires_grad_(True)
        self.capture = ImageAttentionCapture(self.unet, self.blocks)
        self.heads = {
            name: m.heads
            for name, m in self.unet.named_modules()
            if name.endswith("attn2") and name in self.capture.maps
        }
        self.prompts = PromptEncoder(pipe, base.resolution)
        self.scheduler = noise_scheduler(pipe)
        self.terms: list[dict[str, float]] = []
        self.pose = None  # the pose ControlNet's signal: frozen, fed each batch's skeletons
        self._remove_pose = lambda: None
        if pose_controlnet is not None:
            pose_controlnet = pose_controlnet.to(base.device).eval().requires_grad_(False)
            self.pose = ControlSignal(pose_controlnet, torch.zeros(1, 3, 8, 8), scale=1.0, name="pose")
            self._remove_pose = install_controlnet(self.unet, self.pose)

    def close(self) -> None:
        """The base as it was: no capture, no IP attention, no LoRA, its own processors, nothing trainable."""
        self._remove_pose()
        self.capture.release()
        remove_ip_attention(self.unet)
        remove_named_lora(self.unet, LORA_NAME)
        self.unet.set_attn_processor(self.processors)
        self.unet.requires_grad_(False)

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "projection": self.projection}

    def frozen_modules(self) -> dict[str, nn.Module]:
        frozen = {"vae": self.base.pipe.vae, "image_encoder": self.encoder.model, **self.prompts.text_encoders()}
        return frozen | ({"pose_controlnet": self.pose.controlnet} if self.pose is not None else {})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.lora, *self.ip_params, *self.projection.parameters()]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"unet.{n}": p.detach().clone() for n, p in self.unet.named_parameters() if p.requires_grad}
        return state | {f"projection.{k}": v.detach().clone() for k, v in self.projection.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        named = dict(self.unet.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith("unet."):
                    named[key.removeprefix("unet.")].copy_(value)
        self.projection.load_state_dict(
            {k.removeprefix("projection."): v for k, v in state.items() if k.startswith("projection.")}
        )

    def start_from(self, weights: dict[str, dict[str, torch.Tensor]], where: str) -> None:
        """An adapter's weights (official layout, its shape checked by the caller) as the starting point instead of
        fresh ones: the LoRA, the image keys and values, the projection."""
        from peft import set_peft_model_state_dict

        from limner.adapters import load_ip_state_dict
        from limner.methods.storymaker.projection import load_official_state

        state, _ = lora_peft_state(self.unet, weights["ip_adapter"], where)
        set_peft_model_state_dict(self.unet, state, adapter_name=LORA_NAME)
        load_ip_state_dict(self.unet, {"ip_adapter": ip_entries(weights["ip_adapter"])})
        load_official_state(self.projection, weights["image_proj"], str(where))

    def official_lora(self) -> dict[str, torch.Tensor]:
        return lora_official_state(self.unet)

    def _drops(self, b: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(image dropped, text dropped) per sample: one draw each, [0, p_image) image, then text, then both."""
        u = torch.rand(b, generator=generator)
        a, t = self.cfg.drop_image, self.cfg.drop_image + self.cfg.drop_text
        both = (u >= t) & (u < t + self.cfg.drop_both)
        return (u < a) | both, ((u >= a) & (u < t)) | both

    def _read(self, processor_name: str) -> bool:
        """Whether the attention-map loss reads this layer's attention (a cross-attention of the chosen blocks)."""
        return processor_name.endswith("attn2.processor") and processor_name.split(".attentions")[0] in self.blocks

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        vae, device = self.base.pipe.vae, self.base.device
        b, n = batch["masks"].shape[:2]
        if self.pose is not None:
            self.pose.image = batch["poses"].to(device)
        drop_image, drop_text = self._drops(b, generator)
        keep = (~drop_image).repeat_interleave(n).float().to(device)  # per character
        with torch.no_grad():
            latents = sample_latents(vae, batch["images"], generator)
            faces = self.encoder.pixels(batch["faces"]) * keep.view(-1, 1, 1, 1).to(self.encoder.dtype)
            bodies = self.encoder.pixels(batch["bodies"]) * keep.view(-1, 1, 1, 1).to(self.encoder.dtype)
            face_tokens = self.encoder.features(faces, "plus").float()
            body_tokens = self.encoder.features(bodies, "plus").float()
            prompts = ["" if d else p for p, d in zip(batch["prompts"], drop_text.tolist())]
            cond, kwargs = self.prompts.encode_frozen(prompts)
        ids = batch["ids"].to(device) * keep.view(-1, 1)
        keep_face = (torch.rand(b * n, generator=generator) >= self.cfg.drop_face).float().to(device)
        keep_body = (torch.rand(b * n, generator=generator) >= self.cfg.drop_body).float().to(device)
        characters = self.wrapped["projection"](  # forward, not .characters: DDP wraps the module (see forward)
            ids, face_tokens, body_tokens, batch["places"].to(device), keep_face, keep_body, background=False
        )
        projection = self.wrapped["projection"]
        bg = getattr(projection, "module", projection).bg_embed.expand(b, -1, -1)
        tokens = torch.cat([bg, characters.view(b, n * CHARACTER_TOKENS, -1)], dim=1)

        noise = torch.randn(latents.shape, generator=generator).to(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        for calls in self.capture.maps.values():
            calls.clear()
        hidden = with_image_tokens(cond, [tokens.to(cond.dtype)])
        pred = self.wrapped["unet"](noisy, t, hidden, **kwargs).sample.float()
        target = noise.float() if self.scheduler.config.prediction_type == "epsilon" else None
        if target is None:
            target = self.scheduler.get_velocity(latents, noise, t).float()
        err = F.mse_loss(pred, target, reduction="none")
        union = batch["masks"].to(device).amax(1, keepdim=True)
        m = F.interpolate(union, size=err.shape[-2:], mode="bilinear", antialias=True)
        m = m * keep.view(b, n)[:, :1].view(b, 1, 1, 1)  # the official weighting only where the image is given
        denoise = (err * (1 + self.cfg.mask_loss_weight * m)).mean()
        maps = self.capture.take()
        loss = denoise
        terms = {"denoise": float(denoise.detach()), "characters": n}
        if self.cfg.attention_loss_weight and maps:
            attention = attention_map_loss(maps, self.heads, batch["masks"].to(device), b)
            loss = loss + self.cfg.attention_loss_weight * attention
            terms["attention"] = float(attention.detach())
        self.terms.append(terms)
        return loss
