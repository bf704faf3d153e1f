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
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from limner.concepts import read_manifest, write_concept
from limner.errors import LimnerError
from limner.io import cache_dir, disk_guard, written_atomically
from limner.methods import Method, Subject, register, with_settings
from limner.models.saving import save_pipeline
from limner.regions import names, warn_if_unnamed
from limner.training import TrainConfig, TrainingTask, denoising_loss, is_main_process, make_validator, noise_scheduler, train
from limner.training.conditioning import PromptEncoder, concat, select
from limner.training.data import LatentCache, encode_images, image_captions, with_caption

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
PIPELINE_DIR = "pipeline"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PRIOR_MODES = ("none", "class_images", "frozen")


def default_train_config(lora: bool) -> TrainConfig:
    # diffusers' README recipe is lr 5e-6 (full) / 1e-4 (LoRA) for 400-800 steps at 512 px; the small
    # world model moves less per step, so the world defaults are larger. On the world bench's duo_ball
    # (captioned references) LoRA at 300 steps reached subject fidelity 0.15, at 600 steps 0.65.
    return TrainConfig(max_steps=600 if lora else 300, batch_size=4, learning_rate=2e-3 if lora else 2e-4, checkpoint_every=100)


@dataclass
class DreamBoothConfig:
    identifier: str = "sks"
    # None: full fine-tune. dreambooth_lora sets 16: on the world bench rank 16 reached subject fidelity
    # 0.608 against rank 8's 0.556 (prompt fidelity 0.798 vs 0.801), clear of the base on 12 subjects
    # against 11 (cross_cup 0.10 vs 0.03)
    lora_rank: int | None = None
    lora_alpha: float | None = None  # default: the rank
    train_text_encoder: bool = False
    prior_preservation: str = "class_images"  # none | class_images | frozen
    num_class_images: int = 50
    prior_loss_weight: float = 1.0
    class_image_steps: int = 12  # DPM++ steps; the class probe scores 12 steps as 25 (0.963 vs 0.965 on "a dog")
    class_image_batch: int = 16
    class_image_cache: str | None = None  # default: $LIMNER_CACHE/class-images (~/.cache/limner)
    captions: bool = True  # append each reference image's caption (if the subject has them) to its prompt
    train: TrainConfig | None = None


# --------------------------------------------------------------------------------------------
# Class images for prior preservation: drawn once by the frozen base, cached on disk, reused
# --------------------------------------------------------------------------------------------


def class_images(base, class_prompt: str, count: int, steps: int, cache: Path | None, batch_size: int = 16) -> list[np.ndarray]:
    from limner.generation import GenerationSettings, generate

    root = Path(cache or cache_dir("class-images"))
    key = hashlib.sha256(f"{base.fingerprint}|{class_prompt}|{steps}".encode()).hexdigest()[:16]
    folder = root / f"{class_prompt.replace(' ', '_')}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob("*.png"))
    if len(have) < count:
        s = GenerationSettings(class_prompt, num_images=count - len(have), seed=len(have), steps=steps, batch_size=batch_size)
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


def add_lora(model, rank: int, alpha: float, targets: list[str]) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    return [p for n, p in model.named_parameters() if "lora_" in n]


class DreamBoothTask(TrainingTask):
    def __init__(self, pipe, encoder: PromptEncoder, cfg: DreamBoothConfig, instance_prompts: list[str], class_prompt: str):
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
        self.cached = None if cfg.train_text_encoder else {k: encoder.encode_frozen(p) for k, p in self.prompts.items()}

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
            per = denoising_loss(unet, sched, latents, cond, generator, tc.noise_offset, tc.min_snr_gamma, reduction="none", **kw)
            return per[:n].mean() + self.cfg.prior_loss_weight * per[n:].mean()
        cond, kw = self.cond("instance", rows)
        loss = denoising_loss(unet, sched, inst.to(cond), cond, generator, tc.noise_offset, tc.min_snr_gamma, **kw)
        if self.cfg.prior_preservation == "frozen":
            loss = loss + self.cfg.prior_loss_weight * self.frozen_prior(unet, inst.to(cond), generator)
        return loss

    def frozen_prior(self, unet, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """MSE between the tuned and the frozen model's predictions for the class prompt."""
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
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


def to_kohya(diffusers_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA keys -> kohya's (lora_unet_* / lora_te_*, lora_down / lora_up, .alpha)."""
    out = {}
    for key, value in diffusers_state.items():
        prefix, _, rest = key.partition(".")
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight", rest)
        if match is None:
            raise ValueError(f"not a LoRA weight key: {key}")
        module, kind = match.groups()
        sdxl = any(k.startswith("text_encoder_2.") for k in diffusers_state)
        head = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[prefix]
        name = head + module.replace(".", "_")
        part = "lora_down" if kind in ("lora_A", "lora.down") else "lora_up"
        out[f"{name}.{part}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


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
    # the pipeline class's own writer: SD and SDXL files are exactly what their loaders read
    type(pipe).save_lora_weights(out, unet_lora_layers=unet_layers, weight_name=LORA_FILE, safe_serialization=True, **te)
    full = {f"unet.{k}": v for k, v in unet_layers.items()}
    for arg, prefix in (("text_encoder_lora_layers", "text_encoder"), ("text_encoder_2_lora_layers", "text_encoder_2")):
        full |= {f"{prefix}.{k}": v for k, v in te.get(arg, {}).items()}
    with written_atomically(out / KOHYA_FILE) as tmp:
        save_file({k: v.detach().cpu().half().contiguous() for k, v in to_kohya(full, cfg.lora_alpha or cfg.lora_rank).items()}, str(tmp))


def adapter_name(concept: Path, manifest: dict) -> str:
    return f"{manifest['method']}_{Path(concept).name}".replace(".", "_")


def regional_adapters(base, concepts: list[Path], region_prompts: list[str]) -> Callable[[int | None], None]:
    """With regional prompts, each applied LoRA acts in the UNet only in the windows whose prompt names
    its identifier, so one subject's LoRA does not bleed into another's window. `use_window(None)`
    makes every LoRA act everywhere again, as `apply` left them. (A LoRA of the text encoder, if
    trained, acts on every region's prompt: they are encoded once, before denoising.)"""
    manifests = [read_manifest(c) for c in concepts]
    for c, m in zip(concepts, manifests):
        warn_if_unnamed(str(c), m["tokens"], region_prompts)
    adapters = [adapter_name(c, m) for c, m in zip(concepts, manifests)]
    weights = [[1.0 if names(prompt, m["tokens"]) else 0.0 for m in manifests] for prompt in region_prompts]
    everywhere = [1.0] * len(adapters)
    active = everywhere

    def use_window(i: int | None) -> None:
        nonlocal active
        want = everywhere if i is None else weights[i]
        if want != active:  # the text is already encoded: only the UNet's adapters switch
            base.pipe.unet.set_adapters(adapters, weights=want)
            active = want

    return use_window


@register
class DreamBooth(Method):
    name = "dreambooth"
    token_setting = "identifier"
    family = "tuning"
    lora_default = False

    def default_config(self) -> DreamBoothConfig:
        return DreamBoothConfig(lora_rank=16 if self.lora_default else None)

    def default_train_config(self) -> TrainConfig:
        return default_train_config(self.lora_default)

    def personalize(self, base, subject: Subject, out: Path, **overrides) -> Path:
        cfg = with_settings(self.default_config(), overrides, self.name)
        cfg.train = cfg.train or default_train_config(cfg.lora_rank is not None)
        if cfg.lora_rank is not None and cfg.lora_rank <= 0:
            raise LimnerError(f"lora_rank must be a positive integer (--set lora_rank=16), got {cfg.lora_rank}")
        if cfg.prior_preservation not in PRIOR_MODES:
            raise LimnerError(f"prior_preservation {cfg.prior_preservation!r}: use one of {', '.join(PRIOR_MODES)}")
        for name in ("num_class_images", "class_image_steps", "class_image_batch"):
            if getattr(cfg, name) < 1:
                raise LimnerError(f"{name} must be at least 1, got {getattr(cfg, name)}")
        pipe = base.pipe
        if cfg.identifier in ("", subject.class_noun):
            raise LimnerError(f"identifier {cfg.identifier!r} must be a rare word different from the class noun")
        instance_prompt = f"a {cfg.identifier} {subject.class_noun}"
        class_prompt = f"a {subject.class_noun}"
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        inst = encode_images(pipe.vae, subject.images, base.resolution, flip=cfg.train.flip)
        cls_lat: LatentCache | None = None
        if cfg.prior_preservation == "class_images":
            ims = class_images(base, class_prompt, cfg.num_class_images, cfg.class_image_steps, cfg.class_image_cache,
                               cfg.class_image_batch)
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

        t0 = time.perf_counter()
        validate = make_validator(base, [f"{instance_prompt} on the beach", f"{instance_prompt} in the snow"], out,
                                  score=subject.meta.get("score"))
        log = train(task, next_batch, cfg.train, out, desc=f"{self.name} {subject.name}", validate=validate)
        pipe.unet.eval()
        if not is_main_process():
            return out
        with disk_guard(f"the weights in {out}"):
            if cfg.lora_rank is not None:
                save_lora(pipe, out, cfg)
                files = {"diffusers": LORA_FILE, "kohya": KOHYA_FILE}
            else:
                save_pipeline(pipe, out / PIPELINE_DIR)
                files = {"pipeline": PIPELINE_DIR}
        write_concept(out, self.name, subject, base, log, time.perf_counter() - t0, tokens=[cfg.identifier],
                      identifier=cfg.identifier, config=asdict(cfg), files=files, lora=cfg.lora_rank is not None,
                      training_prompts=instance_prompts,
                      example_prompt=f"{instance_prompt} on the beach")
        return out

    def apply(self, base, concept: Path) -> None:
        m = read_manifest(concept)
        concept = Path(concept)
        if m.get("lora"):
            # diffusers' own loader, with an adapter name per concept so several LoRAs compose
            name = adapter_name(concept, m)
            base.pipe.load_lora_weights(str(concept), weight_name=LORA_FILE, adapter_name=name)
            active = list(dict.fromkeys(base.pipe.get_active_adapters() + [name]))
            base.pipe.set_adapters(active)
            return
        from diffusers import UNet2DConditionModel

        from limner.models.loading import dtype_kwarg

        unet = UNet2DConditionModel.from_pretrained(concept / PIPELINE_DIR / "unet", **dtype_kwarg(base.dtype))
        base.pipe.unet = unet.to(base.device)
        if m["config"].get("train_text_encoder"):
            for name in ("text_encoder", "text_encoder_2"):
                if getattr(base.pipe, name, None) is not None:
                    cls = type(getattr(base.pipe, name))
                    setattr(base.pipe, name, cls.from_pretrained(concept / PIPELINE_DIR / name).to(base.device, base.dtype))

    def prompt(self, template: str, concept: Path) -> str:
        m = read_manifest(concept)
        return template.format(f"{m['identifier']} {m['class_noun']}")


@register
class DreamBoothLoRA(DreamBooth):
    name = "dreambooth_lora"
    lora_default = True

