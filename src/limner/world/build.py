"""`limner world build`: trains the world's model stack from renders, resumably.

Stages, each skipped when its output exists, each timed into build.json:
  data      render the training set (images + captions) once, cached in the work folder
  clip      contrastive CLIP (text + vision) on world pairs
  vae       AutoencoderKL, 64 px <-> 16x16x4 latents; then latents of the whole set are cached
  unet      text-to-image UNet on the frozen CLIP text encoder (min-SNR, EMA, warm-up + cosine)
  instances the UNet goes on training on a second set of renders in which single objects are often
            two-tone instances with an emblem, named in most captions (a curriculum: the first set
            teaches the world, the second the detail that tells one instance from another)
  instances_restart  a second cosine cycle on that set at half the learning rate (a warm restart)
  probes    classifiers on renderer ground truth (see probes.py)
  export    a standard diffusers folder in fp16
Checkpoints are written every few hundred steps; an interrupted build continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from limner.errors import LimnerError
from limner.images import to_unit_range
from limner.io import write_json_atomic, write_text_atomic, written_atomically
from limner.models.saving import save_pipeline
from limner.training import min_snr_weights
from limner.world import stack


@dataclass
class BuildConfig:
    seed: int = 0
    dataset_size: int = 80_000
    clip_steps: int = 500
    clip_batch: int = 128
    clip_lr: float = 5e-4
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-6
    unet_steps: int = 6500
    unet_batch: int = 40
    unet_lr: float = 4e-4
    unet_warmup: int = 300
    unet_ema_decay: float = 0.999
    cond_dropout: float = 0.1  # empty caption this often, for classifier-free guidance
    min_snr_gamma: float = 5.0
    instance_dataset_size: int = 60_000
    instance_rate: float = 0.6  # of single objects in the second set
    instance_steps: int = 3000
    instance_lr: float = 2e-4
    instance_warmup: int = 100
    # a second cosine cycle on the same renders at half the learning rate (a warm restart)
    instance_restart_steps: int = 3000
    checkpoint_every: int = 250
    probe_steps: int = 900
    probe_train_size: int = 20_000

    @classmethod
    def quick(cls) -> BuildConfig:
        """A tiny build that runs in a few minutes: proves the pipeline, not fit to ship."""
        return cls(dataset_size=2000, clip_steps=30, clip_batch=64, vae_steps=30, vae_batch=16, unet_steps=40,
                   unet_batch=16, unet_warmup=10, instance_dataset_size=500, instance_steps=20, instance_warmup=5,
                   instance_restart_steps=10, checkpoint_every=20, probe_steps=30, probe_train_size=1000)


# --------------------------------------------------------------------------------------------
# Small utilities shared by the stages
# --------------------------------------------------------------------------------------------


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file."""
    with written_atomically(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path):
    # our own checkpoint, but still loaded without unpickling arbitrary objects
    return torch.load(path, map_location="cpu", weights_only=True)


def autocast(device: torch.device):
    # on CPU, fp32: bf16 is emulated on CPUs without native support (AVX2 only), where a UNet step ran 14x slower
    if device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


class Stage:
    """A resumable training loop: modules, optimizer, step and the data generator's state are saved
    every `every` steps and reloaded on start, so a resumed run continues exactly where it stopped."""

    def __init__(self, name: str, work: Path, total: int, every: int, modules: dict, optimizer, generator: torch.Generator):
        self.name, self.path, self.total, self.every = name, work / f"{name}.ckpt", total, every
        self.modules, self.optimizer, self.generator, self.step = modules, optimizer, generator, 0
        if self.path.exists():
            state = load_checkpoint(self.path)
            for key, module in modules.items():
                module.load_state_dict(state[key])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            self.step = state["step"]
            if self.step < total:
                tqdm.write(f"[{name}] resuming at step {self.step}/{total}")

    def save(self) -> None:
        state = {key: m.state_dict() for key, m in self.modules.items()}
        state.update(optimizer=self.optimizer.state_dict(), generator=self.generator.get_state(), step=self.step)
        atomic_save(state, self.path)

    def steps(self):
        if self.step >= self.total:
            return
        bar = tqdm(range(self.step, self.total), initial=self.step, total=self.total, desc=self.name, mininterval=2)
        for step in bar:
            yield step, bar
            self.step = step + 1
            if self.step % self.every == 0 or self.step == self.total:
                self.save()


# --------------------------------------------------------------------------------------------
# Stage 1: data
# --------------------------------------------------------------------------------------------


def render_dataset(n: int, seed: int, desc: str = "render", instance_rate: float = 0.0) -> tuple[np.ndarray, list[str]]:
    from limner.world.render import render
    from limner.world.scenes import random_scene

    rng = np.random.default_rng(seed)
    images = np.zeros((n, 64, 64, 3), dtype=np.uint8)
    captions = []
    for i in tqdm(range(n), desc=desc, mininterval=2):
        r = render(random_scene(rng, instance_rate=instance_rate))
        images[i] = r.image
        captions.append(r.caption)
    return images, captions


def stage_data(cfg: BuildConfig, work: Path, name: str = "", instance_rate: float = 0.0):
    """The first set (`name` ""), or the second, of instances (`name` "instances")."""
    suffix = f"_{name}" if name else ""
    img_path, cap_path = work / f"images{suffix}.npy", work / f"captions{suffix}.json"
    if not (img_path.exists() and cap_path.exists()):
        n, seed = (cfg.instance_dataset_size, cfg.seed + 10) if name else (cfg.dataset_size, cfg.seed)
        images, captions = render_dataset(n, seed, f"render {name}".strip(), instance_rate)
        write_text_atomic(cap_path, json.dumps(captions))
        np.save(work / "images.tmp.npy", images)
        os.replace(work / "images.tmp.npy", img_path)  # last: its presence marks the stage done
    return np.load(img_path, mmap_mode="r"), json.loads(cap_path.read_text())


# --------------------------------------------------------------------------------------------
# Stage 2: CLIP
# --------------------------------------------------------------------------------------------


def stage_clip(cfg: BuildConfig, work: Path, images, captions, tokenizer, device):
    text_encoder = stack.build_text_encoder(tokenizer).to(device)
    image_encoder = stack.build_image_encoder().to(device)
    text_projection = torch.nn.Linear(stack.TEXT_DIM, stack.TEXT_DIM, bias=False).to(device)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    scale_holder = torch.nn.ParameterDict({"logit_scale": logit_scale})
    params = [*text_encoder.parameters(), *image_encoder.parameters(), *text_projection.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.clip_lr, weight_decay=0.1)
    modules = {"text": text_encoder, "vision": image_encoder, "proj": text_projection, "scale": scale_holder}
    g = torch.Generator().manual_seed(cfg.seed + 1)
    stage = Stage("clip", work, cfg.clip_steps, cfg.checkpoint_every, modules, opt, g)
    ids_all = tokenizer(captions, padding="max_length", truncation=True, max_length=stack.MAX_LENGTH, return_tensors="pt").input_ids
    for step, bar in stage.steps():
        for group in opt.param_groups:
            group["lr"] = cfg.clip_lr * cosine_lr(step, cfg.clip_steps, min(100, cfg.clip_steps // 10 + 1))
        idx = torch.randint(len(captions), (cfg.clip_batch,), generator=g)
        pix = to_unit_range(images[idx.numpy()]).to(device)
        ids = ids_all[idx].to(device)
        with autocast(device):
            txt = text_projection(text_encoder(ids).pooler_output)
            img = image_encoder(pixel_values=pix).image_embeds
        txt, img = F.normalize(txt.float(), dim=-1), F.normalize(img.float(), dim=-1)
        logits = logit_scale.clamp(max=math.log(100)).exp() * img @ txt.t()
        # identical captions in a batch are positives for each other, not negatives
        same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.t().log_softmax(1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return text_encoder.eval(), image_encoder.eval(), text_projection.eval(), logit_scale.detach()


# --------------------------------------------------------------------------------------------
# Stage 3: VAE
# --------------------------------------------------------------------------------------------


def stage_vae(cfg: BuildConfig, work: Path, images, device):
    vae = stack.build_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    stage = Stage("vae", work, cfg.vae_steps, cfg.checkpoint_every, {"vae": vae}, opt, g)
    for step, bar in stage.steps():
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * cosine_lr(step, cfg.vae_steps, min(100, cfg.vae_steps // 10 + 1))
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=g)
        x = to_unit_range(images[idx.numpy()]).to(device)
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=g)).sample
        recon = recon.float()
        loss = (recon - x).abs().mean() + F.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images, device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image (cached, so the UNet stage never runs the
    encoder again)."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="latents", mininterval=2):
        with autocast(device):
            d = vae.encode(to_unit_range(np.asarray(images[i:i + batch])).to(device)).latent_dist
        means.append(d.mean.float().cpu().half())
        stds.append(d.std.float().cpu().half())
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------------------------
# Stage 4: UNet
# --------------------------------------------------------------------------------------------


def training_scheduler():
    from diffusers import DDPMScheduler

    # Stable Diffusion 1.x's training noise schedule
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def train_denoiser(stage: Stage, lr: float, warmup: int, cached: dict, scaling: float, captions, tokenizer, text_encoder,
                   cfg: BuildConfig, device) -> None:
    """Denoising steps of the stage's `unet` (and its `ema`) on `cached` latents (mean, std) until `stage` is done:
    min-SNR loss, warm-up + cosine."""
    g, unet, ema = stage.generator, stage.modules["unet"], stage.modules["ema"]
    scheduler = training_scheduler()
    ids_all = tokenizer(captions, padding="max_length", truncation=True, max_length=stack.MAX_LENGTH, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=stack.MAX_LENGTH, return_tensors="pt").input_ids
    text_encoder.requires_grad_(False)
    t_start, first = time.time(), stage.step
    for step, bar in stage.steps():
        for group in stage.optimizer.param_groups:
            group["lr"] = lr * cosine_lr(step, stage.total, warmup)
        idx = torch.randint(len(captions), (cfg.unet_batch,), generator=g)
        ids = ids_all[idx]
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.cond_dropout
        ids[drop] = empty
        mean, std = cached["mean"][idx].float(), cached["std"][idx].float()
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * scaling
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        latents, noise, noisy, t, ids = (v.to(device) for v in (latents, noise, noisy, t, ids))
        with torch.no_grad(), autocast(device):
            cond = text_encoder(ids).last_hidden_state
        with autocast(device):
            pred = unet(noisy, t, cond).sample
        per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, t, cfg.min_snr_gamma)).mean()
        stage.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        stage.optimizer.step()
        with torch.no_grad():
            decay = min(cfg.unet_ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", s_per_step=f"{(time.time() - t_start) / (step - first + 1):.2f}")


def stage_unet(cfg: BuildConfig, work: Path, name: str, lr: float, warmup: int, steps: int, seed: int, latents, scaling: float,
               captions, tokenizer, text_encoder, device, start: Path | None = None):
    """Trains the UNet (from scratch, or on from the `start` checkpoint's weights) and returns its EMA."""
    unet, ema = stack.build_unet().to(device), stack.build_unet().to(device)
    if start is not None and not (work / f"{name}.ckpt").exists():  # once begun, the stage's own checkpoint is loaded below
        state = load_checkpoint(start)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
    else:
        ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    stage = Stage(name, work, steps, cfg.checkpoint_every, {"unet": unet, "ema": ema}, opt, torch.Generator().manual_seed(seed))
    train_denoiser(stage, lr, warmup, latents, scaling, captions, tokenizer, text_encoder, cfg, device)
    return ema.eval()


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_pipeline(out: Path, tokenizer, text_encoder, image_encoder, text_projection, logit_scale, vae, unet) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    scheduler = DPMSolverMultistepScheduler.from_config(training_scheduler().config)
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=feature_extractor, image_encoder=image_encoder,
                                   requires_safety_checker=False)
    save_pipeline(pipe, out)
    # CLIP-T needs the text projection, which the SD text encoder (CLIPTextModel) does not carry
    save_file({"text_projection.weight": text_projection.weight.detach().half().contiguous(),
               "logit_scale": logit_scale.reshape(1).float()}, str(out / "clip_text_projection.safetensors"))


def stage_probes(cfg: BuildConfig, work: Path, vae) -> dict:
    """Trains each probe not yet trained (the subject probe also on `vae`'s round trips); returns their
    accuracies on fresh renders."""
    from limner.world.probes import SPECS, save_probe, train_probe

    folder = work / "probes"
    metrics = {}
    for name in SPECS:
        meta = folder / f"{name}.json"
        if not meta.exists():
            n_train = min(cfg.probe_train_size, SPECS[name].train_size or cfg.probe_train_size)
            net, acc = train_probe(name, steps=cfg.probe_steps, n_train=n_train, seed=cfg.seed, vae=vae)
            save_probe(net, name, folder, acc)
        metrics[name] = json.loads(meta.read_text())["accuracy"]
    return metrics


def build(out: Path, work: Path, cfg: BuildConfig, device: str = "auto") -> dict:
    """Runs every stage not yet done and writes the world folder `out` (base/: a diffusers folder,
    probes/: the probes). Returns the build record."""
    from limner.models.loading import resolve_device

    dev = resolve_device(device)
    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "build.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"config": asdict(cfg), "seconds": {}}
    if record["config"] != asdict(cfg):
        raise LimnerError(f"--work {work} holds a build with another configuration; use another --work folder or delete it")

    def timed(name, fn, *args, **kwargs):
        t0 = time.time()
        result = fn(*args, **kwargs)
        record["seconds"][name] = round(record["seconds"].get(name, 0) + time.time() - t0, 1)
        write_json_atomic(record_path, record)
        return result

    torch.manual_seed(cfg.seed)
    tokenizer = stack.build_tokenizer()
    images, captions = timed("data", stage_data, cfg, work)
    text_encoder, image_encoder, text_projection, logit_scale = timed("clip", stage_clip, cfg, work, images, captions, tokenizer, dev)
    vae = timed("vae", stage_vae, cfg, work, images, dev)

    def cached_latents(name: str, images) -> dict:
        path = work / f"{name}.pt"
        if not path.exists():
            atomic_save(dict(zip(("mean", "std"), timed(name, encode_latents, vae, images, dev))), path)
        return load_checkpoint(path)

    lat = cached_latents("latents", images)
    scaling = float(1.0 / (lat["mean"].float().std()))
    vae.register_to_config(scaling_factor=scaling)
    unet = timed("unet", stage_unet, cfg, work, "unet", cfg.unet_lr, cfg.unet_warmup, cfg.unet_steps, cfg.seed + 3, lat, scaling,
                 captions, tokenizer, text_encoder, dev)
    if cfg.instance_steps:
        images, captions = timed("data_instances", stage_data, cfg, work, "instances", cfg.instance_rate)
        lat = cached_latents("latents_instances", images)
        unet = timed("instances", stage_unet, cfg, work, "instances", cfg.instance_lr, cfg.instance_warmup, cfg.instance_steps,
                     cfg.seed + 4, lat, scaling, captions, tokenizer, text_encoder, dev, start=work / "unet.ckpt")
        if cfg.instance_restart_steps:
            unet = timed("instances_restart", stage_unet, cfg, work, "instances_restart", cfg.instance_lr / 2, cfg.instance_warmup,
                         cfg.instance_restart_steps, cfg.seed + 5, lat, scaling, captions, tokenizer, text_encoder, dev,
                         start=work / "instances.ckpt")
    record["probes"] = timed("probes", stage_probes, cfg, work, vae)
    timed("export", export_pipeline, out / "base", tokenizer, text_encoder.cpu(), image_encoder.cpu(), text_projection.cpu(), logit_scale.cpu(), vae.cpu(), unet.cpu())
    shutil.copytree(work / "probes", out / "probes", dirs_exist_ok=True)
    record["device"] = str(dev)
    record["torch"] = torch.__version__
    write_json_atomic(out / "base" / "build.json", record)
    write_json_atomic(record_path, record)
    return record
