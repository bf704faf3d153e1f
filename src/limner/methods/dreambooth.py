"""DreamBooth (Ruiz et al., 2023): fine-tune the model itself on "a [V] [class noun]".

The subject is bound to a rare identifier [V] by fine-tuning the UNet (optionally the text encoder)
on the reference images, captioned "a [V] [class noun]". The class-specific prior preservation loss
keeps the class: the frozen model first draws N images of "a [class noun]", and the loss adds
w * MSE on those with the class prompt, so "a dog" still means any dog. Two variants beside the
paper's: LoRA (low-rank adapters through peft, instead of all UNet weights), and prior preservation
without class images (regularise against the frozen model's own prediction on the same batch).
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from limner.adapters.lora import (
    adapters_per_window,
    add_lora,
    joining_the_active,
    others_kept_active,
    text_encoder_lora_problem,
    to_kohya,
)
from limner.concepts import read_manifest
from limner.errors import LimnerError
from limner.io import cache_dir, check_safetensors, check_weight_files, child, written_atomically
from limner.methods.base import Capabilities, Installation
from limner.methods.registry import register
from limner.methods.settings import recipe_setting, setting
from limner.methods.tuning import TuningMethod, TuningRun
from limner.models.saving import save_pipeline
from limner.regions import prompt_names, warn_if_unnamed
from limner.subject import Subject
from limner.training import TrainConfig, TrainingTask, denoising_loss, noise_scheduler
from limner.training.conditioning import PromptEncoder, concat, select
from limner.training.data import LatentCache, encode_images, image_captions, with_caption
from limner.values import parse_fields

if TYPE_CHECKING:
    from limner.models.loading import Base

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
PIPELINE_DIR = "pipeline"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PRIOR_MODES = ("none", "class_images", "frozen")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the pipeline attributes a text-encoder LoRA goes into


def default_train_config(lora: bool) -> TrainConfig:
    # diffusers' README recipe is lr 5e-6 (full) / 1e-4 (LoRA) for 400-800 steps at 512 px; the small
    # world model moves less per step, so the world defaults are larger (docs/README.md)
    return TrainConfig(
        max_steps=600 if lora else 300, batch_size=4, learning_rate=2e-3 if lora else 2e-4, checkpoint_every=100
    )


# The paper's method as diffusers' example README trains it (examples/dreambooth): instance prompts without
# captions, batch 1, weight decay 1e-2; full: prior preservation on 200 class images, lr 5e-6, 800 steps;
# LoRA: rank 4 (alpha 4), no prior preservation, lr 1e-4, 500 steps
PAPER_RECIPE = {"captions": False, "batch_size": 1, "weight_decay": 1e-2, "checkpoint_every": 100}
PAPER_RECIPE_FULL = PAPER_RECIPE | {
    "prior_preservation": "class_images",
    "num_class_images": 200,
    "learning_rate": 5e-6,
    "max_steps": 800,
}
PAPER_RECIPE_LORA = PAPER_RECIPE | {
    "lora_rank": 4,
    "prior_preservation": "none",
    "learning_rate": 1e-4,
    "max_steps": 500,
}


@dataclass
class DreamBoothConfig:
    identifier: str = setting("sks", "the rare word [V] bound to the subject", word=True, flag="--token")
    lora_rank: int | None = setting(
        None, "None: fine-tune the whole UNet; N: rank-N LoRA adapters (dreambooth_lora: 16)", at_least=1
    )
    lora_alpha: float | None = setting(None, "LoRA scale numerator (default: the rank)", above=0)
    train_text_encoder: bool = setting(False, "also train the text encoder(s)")
    prior_preservation: str = setting(
        "class_images",
        "none | class_images (the paper's) | frozen (the frozen model's own "
        "prediction on the same batch, no class images)",
        choices=PRIOR_MODES,
    )
    num_class_images: int = setting(
        50, "class images the frozen base draws once (cached) for prior preservation", at_least=1
    )
    prior_loss_weight: float = setting(1.0, "weight of the prior-preservation loss", at_least=0)
    class_image_steps: int = setting(
        12, "DPM++ steps per class image (the class probe scores 12 steps as 25)", at_least=1
    )
    class_image_batch: int = setting(16, "class images drawn per batch", at_least=1)
    class_image_cache: str | None = setting(None, "where class images are kept (default: $LIMNER_CACHE/class-images)")
    captions: bool = setting(True, "append each reference image's caption (if it has one) to its prompt")
    recipe: str = recipe_setting()
    train: TrainConfig | None = setting(None, "trainer settings (default: the method's)")

    def __post_init__(self) -> None:
        parse_fields(self)  # every setting to its declared type and values, however the settings were built


# --------------------------------------------------------------------------------------------
# Class images for prior preservation: drawn once by the frozen base, cached on disk, reused
# --------------------------------------------------------------------------------------------


# how every class image was drawn before the key named it: a cache whose key leaves a setting out was drawn
# with this value of it (fp32: the world bases' and the CPU's precision)
CLASS_IMAGE_DRAWN = {"scheduler": "dpm++", "guidance": 5.0, "negative": "", "dtype": "float32"}


def class_image_key(
    base,
    class_prompt: str,
    steps: int,
    guidance_scale: float = 5.0,
    scheduler: str = "dpm++",
    resolution: int | None = None,
    negative_prompt: str = "",
) -> str:
    """The cache key of class images: the base, the prompt, and everything else that changes what is drawn.
    A setting at the value every earlier cache was drawn with is left out of the key, so those caches
    keep their key; steps is an integer, so no earlier key can equal one with a setting added."""
    drawn = {
        "scheduler": scheduler,
        "guidance": float(guidance_scale),
        "negative": negative_prompt,
        "dtype": str(base.dtype).removeprefix("torch."),
        "size": resolution or base.resolution,
    }
    earlier = CLASS_IMAGE_DRAWN | {"size": base.resolution}
    extra = [f"{k}={v}" for k, v in drawn.items() if v != earlier[k]]
    return hashlib.sha256("|".join([base.fingerprint, class_prompt, str(steps), *extra]).encode()).hexdigest()[:16]


def class_images(
    base,
    class_prompt: str,
    count: int,
    steps: int,
    cache: Path | None,
    batch_size: int = 16,
    *,
    guidance_scale: float = 5.0,
    scheduler: str = "dpm++",
    resolution: int | None = None,
    negative_prompt: str = "",
) -> list[np.ndarray]:
    """`count` images of the class prompt drawn by the frozen base (square, `resolution` px; default the
    base's own), cached under a key of everything that changes them. The batch size is not in it: each
    image has its own generator (generation.py), so batching does not change what is drawn."""
    from limner.generation import GenerationSettings, generate

    root = Path(cache or cache_dir("class-images"))
    key = class_image_key(base, class_prompt, steps, guidance_scale, scheduler, resolution, negative_prompt)
    folder = child(root, f"{class_prompt.replace(' ', '_')}-{key}", "the class prompt")
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob("*.png"))
    if len(have) < count:
        s = GenerationSettings(
            class_prompt,
            negative_prompt=negative_prompt,
            num_images=count - len(have),
            seed=len(have),
            steps=steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            height=resolution,
            width=resolution,
            batch_size=batch_size,
        )
        for i, im in enumerate(generate(base, s).images):
            with written_atomically(folder / f"{len(have) + i:05d}.png") as tmp:
                im.save(tmp, format="PNG")
        have = sorted(folder.glob("*.png"))
    out = []
    for p in have[:count]:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class DreamBoothTask(TrainingTask):
    def __init__(
        self, pipe, encoder: PromptEncoder, cfg: DreamBoothConfig, instance_prompts: list[str], class_prompt: str
    ):
        self.pipe, self.encoder, self.cfg = pipe, encoder, cfg
        self.train_cfg = cfg.train
        self.noise = noise_scheduler(pipe)
        pipe.vae.requires_grad_(False)
        encoders = encoder.text_encoders()
        for te in encoders.values():
            te.requires_grad_(False)
        lora = cfg.lora_rank is not None
        if lora:
            pipe.unet.requires_grad_(False)
            alpha = cfg.lora_alpha or cfg.lora_rank
            self.params = add_lora(pipe.unet, cfg.lora_rank, alpha, UNET_TARGETS)
            if cfg.train_text_encoder:
                for te in encoders.values():
                    self.params += add_lora(te, cfg.lora_rank, alpha, TEXT_TARGETS)
        else:
            pipe.unet.requires_grad_(True)
            self.params = list(pipe.unet.parameters())
            if cfg.train_text_encoder:
                for te in encoders.values():
                    te.requires_grad_(True)
                    self.params += list(te.parameters())
        # a frozen copy of the model's prediction, for prior preservation without class images
        self.frozen_unet = None
        if cfg.prior_preservation == "frozen" and not lora:
            self.frozen_unet = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
        # one instance prompt per reference image (its caption included), one class prompt
        self.prompts = {"instance": instance_prompts, "class": [class_prompt]}
        self.tokens = {k: encoder.tokenize(p) for k, p in self.prompts.items()}
        # text-encoder outputs are cached whenever the text encoders are frozen
        self.cached = (
            None if cfg.train_text_encoder else {k: encoder.encode_frozen(p) for k, p in self.prompts.items()}
        )

    def modules(self):
        mods = {"unet": self.pipe.unet}
        if self.cfg.train_text_encoder:
            mods.update(self.encoder.text_encoders())
        return mods

    def frozen_modules(self):
        return {} if self.frozen_unet is None else {"frozen_unet": self.frozen_unet}

    def trainable_parameters(self):
        return self.params

    def cond(self, which: str, rows: list[int]) -> tuple[torch.Tensor, dict]:
        """Conditioning for rows of the instance prompts (one per reference image) or the class prompt."""
        if self.cached is not None:
            return select(*self.cached[which], rows)
        return self.encoder.encode(self.tokens[which][rows], self.wrapped)

    def loss(self, batch, generator):
        unet, sched, tc = self.wrapped["unet"], self.noise, self.train_cfg
        inst, rows = batch["instance"], batch["image"].tolist()
        n = inst.shape[0]
        if "class" in batch:  # the paper's prior preservation: instance and class images in one batch
            cond, kw = concat([self.cond("instance", rows), self.cond("class", [0] * batch["class"].shape[0])])
            latents = torch.cat([inst, batch["class"]]).to(cond)
            per = denoising_loss(
                unet, sched, latents, cond, generator, tc.noise_offset, tc.min_snr_gamma, reduction="none", **kw
            )
            return per[:n].mean() + self.cfg.prior_loss_weight * per[n:].mean()
        cond, kw = self.cond("instance", rows)
        loss = denoising_loss(unet, sched, inst.to(cond), cond, generator, tc.noise_offset, tc.min_snr_gamma, **kw)
        if self.cfg.prior_preservation == "frozen":
            loss = loss + self.cfg.prior_loss_weight * self.frozen_prior(unet, inst.to(cond), generator)
        return loss

    def frozen_prior(self, unet, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """MSE between the tuned and the frozen model's predictions for the class prompt."""
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(
            latents.device
        )
        noisy = self.noise.add_noise(latents, noise, t)
        cond, kw = self.cond("class", [0] * latents.shape[0])
        with torch.no_grad():
            if self.frozen_unet is not None:
                target = self.frozen_unet(noisy, t, cond, **kw).sample
            else:  # LoRA: the frozen model is the same UNet with its adapters off
                base_unet = self.pipe.unet
                base_unet.disable_adapters()
                target = base_unet(noisy, t, cond, **kw).sample
                base_unet.enable_adapters()
        return F.mse_loss(unet(noisy, t, cond, **kw).sample.float(), target.float())

    def _named(self) -> dict[str, torch.nn.Parameter]:
        named = dict(self.pipe.unet.named_parameters(prefix="unet"))
        for name, te in self.encoder.text_encoders().items():
            named.update(te.named_parameters(prefix=name))
        return named

    def trainable_state(self):
        ids = {id(p) for p in self.params}
        return {k: v.detach().float() for k, v in self._named().items() if id(v) in ids}

    def load_trainable_state(self, state):
        named = self._named()
        with torch.no_grad():
            for k, v in state.items():
                named[k].copy_(v.to(named[k]))


# --------------------------------------------------------------------------------------------
# Saving: diffusers LoRA + kohya layout, or a full pipeline folder
# --------------------------------------------------------------------------------------------


def save_lora(pipe, out: Path, cfg: DreamBoothConfig) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    def layers(model):
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))

    unet_layers = layers(pipe.unet)
    te = {"text_encoder_lora_layers": layers(pipe.text_encoder)} if cfg.train_text_encoder else {}
    if cfg.train_text_encoder and getattr(pipe, "text_encoder_2", None) is not None:
        te["text_encoder_2_lora_layers"] = layers(pipe.text_encoder_2)
    # the pipeline class's own writer: SD and SDXL files are exactly what their loaders read. It writes in
    # place, so it writes into a folder of its own beside the file (same disk), renamed over the old file
    # once complete: a crash leaves the previous weights, never a half-written file under their name
    tmp = Path(tempfile.mkdtemp(prefix=f".{LORA_FILE}.", dir=out))
    try:
        type(pipe).save_lora_weights(
            tmp, unet_lora_layers=unet_layers, weight_name=LORA_FILE, safe_serialization=True, **te
        )
        os.replace(tmp / LORA_FILE, out / LORA_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    full = {f"unet.{k}": v for k, v in unet_layers.items()}
    for arg, prefix in (
        ("text_encoder_lora_layers", "text_encoder"),
        ("text_encoder_2_lora_layers", "text_encoder_2"),
    ):
        full |= {f"{prefix}.{k}": v for k, v in te.get(arg, {}).items()}
    with written_atomically(out / KOHYA_FILE) as tmp:
        save_file(
            {
                k: v.detach().cpu().half().contiguous()
                for k, v in to_kohya(full, cfg.lora_alpha or cfg.lora_rank).items()
            },
            str(tmp),
        )


def adapter_name(concept: Path, manifest: dict) -> str:
    return f"{manifest['method']}_{Path(concept).name}".replace(".", "_")


@register
class DreamBooth(TuningMethod):
    name = "dreambooth"
    config_cls = DreamBoothConfig
    capabilities = Capabilities(regional=True)
    token_setting = "identifier"
    install_group = "dreambooth"  # full and LoRA concepts install together: the full UNet first, LoRAs onto it
    installs_first = True  # a full concept replaces the UNet, so other methods' weights go onto it
    lora_default = False

    def default_config(self) -> DreamBoothConfig:
        return DreamBoothConfig(lora_rank=16 if self.lora_default else None)

    def default_train_config(self, num_subjects: int = 1) -> TrainConfig:
        return default_train_config(self.lora_default)

    def recipes(self, num_subjects: int = 1) -> dict[str, dict[str, Any]]:
        return {"paper": PAPER_RECIPE_LORA if self.lora_default else PAPER_RECIPE_FULL}

    def train_defaults(self, cfg: DreamBoothConfig, num_subjects: int) -> TrainConfig:
        return default_train_config(cfg.lora_rank is not None)

    def prepare(self, base: Base, subjects: list[Subject], cfg: DreamBoothConfig) -> TuningRun:
        (subject,) = subjects
        pipe = base.pipe
        if cfg.identifier in ("", subject.class_noun):
            raise LimnerError(f"identifier {cfg.identifier!r} must be a rare word different from the class noun")
        if cfg.lora_rank is not None and cfg.train_text_encoder and (problem := text_encoder_lora_problem()):
            # before the class images and the training, which the refusal would otherwise end
            raise LimnerError(
                f"--set train_text_encoder=true: {problem}; or leave the text encoder frozen "
                "(train_text_encoder=false)"
            )
        instance_prompt = f"a {cfg.identifier} {subject.class_noun}"
        class_prompt = f"a {subject.class_noun}"
        inst = encode_images(pipe.vae, subject.images, base.resolution, flip=cfg.train.flip)
        cls_lat: LatentCache | None = None
        if cfg.prior_preservation == "class_images":
            ims = class_images(
                base,
                class_prompt,
                cfg.num_class_images,
                cfg.class_image_steps,
                cfg.class_image_cache,
                cfg.class_image_batch,
            )
            cls_lat = encode_images(pipe.vae, ims, base.resolution, flip=False)
        instance_prompts = [with_caption(instance_prompt, c) for c in image_captions(subject, cfg.captions)]
        task = DreamBoothTask(pipe, PromptEncoder(pipe, base.resolution), cfg, instance_prompts, class_prompt)
        bs = cfg.train.batch_size

        def next_batch(g: torch.Generator) -> dict:
            idx = torch.randint(len(inst.mean), (bs,), generator=g)
            batch = {"instance": inst.sample(idx, g), "image": inst.source[idx]}
            if cls_lat is not None:
                batch["class"] = cls_lat.sample(torch.randint(len(cls_lat.mean), (bs,), generator=g), g)
            return batch

        return TuningRun(
            task,
            next_batch,
            [f"{instance_prompt} on the beach", f"{instance_prompt} in the snow"],
            f"{self.name} {subject.name}",
            {"instance_prompts": instance_prompts, "instance_prompt": instance_prompt},
        )

    def save(self, base: Base, subjects: list[Subject], cfg: DreamBoothConfig, run: TuningRun, out: Path) -> dict:
        if cfg.lora_rank is not None:
            save_lora(base.pipe, out, cfg)
            files = {"diffusers": LORA_FILE, "kohya": KOHYA_FILE}
        else:
            save_pipeline(base.pipe, out / PIPELINE_DIR)
            files = {"pipeline": PIPELINE_DIR}
        return {
            "tokens": [cfg.identifier],
            "identifier": cfg.identifier,
            "config": asdict(cfg),
            "files": files,
            "lora": cfg.lora_rank is not None,
            "training_prompts": run.state["instance_prompts"],
            "example_prompt": f"{run.state['instance_prompt']} on the beach",
        }

    def install(self, base: Base, concepts: list[Path], regions: list[str] | None = None) -> Installation:
        manifests = [read_manifest(c) for c in concepts]
        full = [c for c, m in zip(concepts, manifests) if not m.get("lora")]
        if len(full) > 1:
            raise LimnerError(
                f"--concept {full[0]} and --concept {full[1]} are both full DreamBooth models, and each replaces the "
                "whole UNet; compose LoRA concepts instead (train with --method dreambooth_lora)"
            )
        for concept, m in zip(concepts, manifests):  # checked before anything is installed, so nothing needs undoing
            if (
                m.get("lora")
                and m.get("config", {}).get("train_text_encoder")
                and (problem := text_encoder_lora_problem())
            ):
                raise LimnerError(
                    f"concept {concept} has a LoRA on the text encoder, which cannot be loaded here: {problem}"
                )
        installation = Installation()
        if full:
            installation.undo.append(install_full(base, full[0], read_manifest(full[0])))
        loras = [(c, m) for c, m in zip(concepts, manifests) if m.get("lora")]
        if not loras:
            return installation
        names = [adapter_name(c, m) for c, m in loras]
        for (concept, m), name in zip(loras, names):
            # diffusers' own loader, with an adapter name per concept so several LoRAs compose; it makes the new
            # adapter the only active one, so each model joins it to the adapters it ran (at their weights)
            check_safetensors(Path(concept) / LORA_FILE)  # a damaged file named, not a traceback from the loader
            models = [base.pipe.unet]
            if m.get("config", {}).get("train_text_encoder"):
                models += [te for n in TEXT_ENCODERS if (te := getattr(base.pipe, n, None)) is not None]
            with ExitStack() as joining:
                for model in models:
                    joining.enter_context(joining_the_active(model, name))
                base.pipe.load_lora_weights(str(concept), weight_name=LORA_FILE, adapter_name=name)
        installation.undo.append(lambda: remove_adapters(base.pipe, names))
        if regions:
            # each LoRA acts in the UNet only in the windows whose prompt names its identifier, so one
            # subject's LoRA does not bleed into another's window (a text-encoder LoRA acts on every region)
            for c, m in loras:
                warn_if_unnamed(str(c), m["tokens"], regions)
            weights = [[1.0 if prompt_names(prompt, m["tokens"]) else 0.0 for _, m in loras] for prompt in regions]
            installation.before_window = adapters_per_window(base.pipe.unet, names, weights)
        return installation

    def acts_in(self, manifest: dict, region_prompt: str) -> bool:
        return not manifest.get("lora") or super().acts_in(manifest, region_prompt)  # a full UNet acts in every window

    def prompt(self, template: str, concept: Path) -> str:
        m = read_manifest(concept)
        return template.format(f"{m['identifier']} {m['class_noun']}")


def install_full(base: Base, concept: Path, manifest: dict) -> Callable[[], None]:
    """Puts a full DreamBooth concept's UNet (and text encoders, if trained) in the pipeline; returns
    what puts the base's back."""
    from diffusers import UNet2DConditionModel

    from limner.models.loading import dtype_kwarg

    pipe = base.pipe
    names = ["unet"] + (
        [n for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None]
        if manifest["config"].get("train_text_encoder")
        else []
    )
    originals = {n: getattr(pipe, n) for n in names}
    check_weight_files(concept / PIPELINE_DIR)
    pipe.unet = UNet2DConditionModel.from_pretrained(concept / PIPELINE_DIR / "unet", **dtype_kwarg(base.dtype)).to(
        base.device
    )
    for name in names[1:]:
        cls = type(originals[name])
        setattr(pipe, name, cls.from_pretrained(concept / PIPELINE_DIR / name).to(base.device, base.dtype))

    def restore() -> None:
        for name, module in originals.items():
            setattr(pipe, name, module)

    return restore


def remove_adapters(pipe: Any, names: list[str]) -> None:
    """Deletes the named LoRA adapters; once none is left, peft's wrappers go too, so the base runs as it did."""
    with others_kept_active(pipe.unet, names):  # a user's own LoRA stays active at its weight
        pipe.delete_adapters(names)
    if not any(pipe.get_list_adapters().values()):
        pipe.unload_lora_weights()


@register
class DreamBoothLoRA(DreamBooth):
    name = "dreambooth_lora"
    lora_default = True
