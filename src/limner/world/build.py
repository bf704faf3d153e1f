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

Every training stage runs on the shared loop, `limner.training.train`, as a `TrainingTask`
(world/stages.py): its schedule (warm-up, cosine down to LR_FLOOR of the peak), the UNet's EMA,
checkpoints every `checkpoint_every` steps in work/STAGE/checkpoints/ (an interrupted build continues
exactly where it stopped, `resume="latest"`), train_log.csv with time per step and MFU, and mixed
precision on a GPU (bf16, else fp16 with loss scaling). Each stage keeps the settings it had in its
own loop (losses, batch sizes, learning rates, weight decay, warm-up, EMA, dropout, gradient clipping
of the UNet only). What differs from that loop, so a build is not bit-identical to an older one:
- the generator that draws batches and noise is seeded (seed + k) * 1000 by the loop (it was seed + k),
  and each stage's models are initialised after torch.manual_seed(seed + k) (the global generator ran
  on from the build's start); the probes train on the loop too, so they resume mid-stage now;
- AdamW is torch's fused kernel; fp16 (a GPU without bf16) scales the loss (there was no scaler);
- the instances stages start from the previous stage's trained weights, as before, but their EMA
  starts from those weights too (it started from the previous EMA; the EMA's warm-up leaves that
  start a weight of ~3e-7 after 20 steps);
- a work folder of the old loop (STAGE.ckpt files) is refused rather than silently retrained.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from limner.errors import LimnerError
from limner.images import to_unit_range
from limner.io import write_json_atomic, write_text_atomic, written_atomically
from limner.models.saving import save_pipeline
from limner.training import HALF, TrainConfig, find_checkpoint, train, trained_state
from limner.world import stack
from limner.world.stages import (
    ClipTask,
    DenoiserTask,
    ProbeTask,
    VaeTask,
    WorldClip,
    clip_batches,
    image_batches,
    latent_batches,
    probe_batches,
    training_scheduler,
)

LR_FLOOR = 0.1  # every stage's cosine ends at a tenth of its peak learning rate (the probes' ends at 0)
# the probes' training settings
PROBE_BATCH, PROBE_LR, PROBE_WEIGHT_DECAY = 128, 2e-3, 1e-4


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
        return cls(
            dataset_size=2000,
            clip_steps=30,
            clip_batch=64,
            vae_steps=30,
            vae_batch=16,
            unet_steps=40,
            unet_batch=16,
            unet_warmup=10,
            instance_dataset_size=500,
            instance_steps=20,
            instance_warmup=5,
            instance_restart_steps=10,
            checkpoint_every=20,
            probe_steps=30,
            probe_train_size=1000,
        )


# --------------------------------------------------------------------------------------------
# Small utilities shared by the stages
# --------------------------------------------------------------------------------------------


def save_tensors(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file."""
    with written_atomically(path) as tmp:
        torch.save(obj, tmp)


def load_tensors(path: Path):
    # our own file, but still loaded without unpickling arbitrary objects
    return torch.load(path, map_location="cpu", weights_only=True)


def mixed_precision(device: torch.device) -> str:
    """The precision the build trains and encodes in on `device`: on CPU fp32 (bf16 is emulated on CPUs
    without native support, AVX2 only, where a UNet step ran 14x slower), on a GPU bf16, else fp16."""
    if device.type == "cpu":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device):
    """mixed_precision()'s autocast, for the stages that run models outside the training loop."""
    precision = mixed_precision(device)
    return contextlib.nullcontext() if precision == "no" else torch.autocast(device.type, dtype=HALF[precision])


def warmup_steps(steps: int) -> int:
    """CLIP's and the VAE's warm-up: a tenth of the stage, at most 100 steps."""
    return min(100, steps // 10 + 1)


def stage_config(cfg: BuildConfig, device: torch.device, **settings) -> TrainConfig:
    """A stage's loop settings: cosine to LR_FLOOR, resumed from its newest checkpoint, one checkpoint kept
    (a UNet stage's is four copies of the UNet: weights, EMA, AdamW's two moments)."""
    base = dict(
        lr_schedule="cosine",
        lr_floor=LR_FLOOR,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=1,
        resume="latest",
        mixed_precision=mixed_precision(device),
    )
    return TrainConfig(**(base | settings))


# --------------------------------------------------------------------------------------------
# Stage 1: data
# --------------------------------------------------------------------------------------------


def render_dataset(
    n: int, seed: int, desc: str = "render", instance_rate: float = 0.0
) -> tuple[np.ndarray, list[str]]:
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


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", truncation=True, max_length=stack.MAX_LENGTH, return_tensors="pt"
    ).input_ids


def stage_clip(cfg: BuildConfig, work: Path, images, captions, tokenizer, device):
    torch.manual_seed(cfg.seed + 1)
    clip = WorldClip(tokenizer).to(device)
    settings = stage_config(
        cfg,
        device,
        max_steps=cfg.clip_steps,
        batch_size=cfg.clip_batch,
        learning_rate=cfg.clip_lr,
        weight_decay=0.1,
        lr_warmup_steps=warmup_steps(cfg.clip_steps),
        max_grad_norm=0.0,
        seed=cfg.seed + 1,
    )
    train(
        ClipTask(clip),
        clip_batches(images, tokenize(tokenizer, captions), cfg.clip_batch),
        settings,
        work / "clip",
        desc="clip",
    )
    clip.eval()
    return clip.text, clip.vision, clip.proj, clip.logit_scale.detach()


# --------------------------------------------------------------------------------------------
# Stage 3: VAE
# --------------------------------------------------------------------------------------------


def stage_vae(cfg: BuildConfig, work: Path, images, device):
    torch.manual_seed(cfg.seed + 2)
    vae = stack.build_vae().to(device)
    settings = stage_config(
        cfg,
        device,
        max_steps=cfg.vae_steps,
        batch_size=cfg.vae_batch,
        learning_rate=cfg.vae_lr,
        weight_decay=0.0,
        lr_warmup_steps=warmup_steps(cfg.vae_steps),
        max_grad_norm=0.0,
        seed=cfg.seed + 2,
    )
    train(VaeTask(vae, cfg.vae_kl_weight), image_batches(images, cfg.vae_batch), settings, work / "vae", desc="vae")
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images, device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image (cached, so the UNet stage never runs the
    encoder again)."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="latents", mininterval=2):
        with autocast(device):
            d = vae.encode(to_unit_range(np.asarray(images[i : i + batch])).to(device)).latent_dist
        means.append(d.mean.float().cpu().half())
        stds.append(d.std.float().cpu().half())
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------------------------
# Stage 4: UNet
# --------------------------------------------------------------------------------------------


def stage_unet(
    cfg: BuildConfig,
    work: Path,
    name: str,
    lr: float,
    warmup: int,
    steps: int,
    seed: int,
    latents,
    scaling: float,
    captions,
    tokenizer,
    text_encoder,
    device,
    start: str | None = None,
):
    """Trains the UNet (from scratch, or on from the trained weights of stage `start`) and returns its EMA."""
    torch.manual_seed(seed)
    task = DenoiserTask(stack.build_unet().to(device), text_encoder, cfg.min_snr_gamma)
    if start is not None and find_checkpoint(work / name, "latest") is None:  # once begun, the stage resumes its own
        task.load_trainable_state(trained_state(work / start))
    empty = tokenize(tokenizer, [""])
    batches = latent_batches(latents, scaling, tokenize(tokenizer, captions), empty, cfg.unet_batch, cfg.cond_dropout)
    settings = stage_config(
        cfg,
        device,
        max_steps=steps,
        batch_size=cfg.unet_batch,
        learning_rate=lr,
        weight_decay=0.01,
        lr_warmup_steps=warmup,
        max_grad_norm=1.0,
        ema_decay=cfg.unet_ema_decay,
        seed=seed,
    )
    train(task, batches, settings, work / name, desc=name)
    return task.model.eval()  # the loop swapped the EMA in at the end


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_pipeline(
    out: Path, tokenizer, text_encoder, image_encoder, text_projection, logit_scale, vae, unet
) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    scheduler = DPMSolverMultistepScheduler.from_config(training_scheduler().config)
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=feature_extractor,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    )
    save_pipeline(pipe, out)
    # CLIP-T needs the text projection, which the SD text encoder (CLIPTextModel) does not carry
    save_file(
        {
            "text_projection.weight": text_projection.weight.detach().half().contiguous(),
            "logit_scale": logit_scale.reshape(1).float(),
        },
        str(out / "clip_text_projection.safetensors"),
    )


def stage_probes(cfg: BuildConfig, work: Path, vae) -> dict:
    """Trains each probe not yet trained (the generator-styled ones also on `vae`'s round trips); returns
    their accuracies on fresh renders."""
    from limner.world.probes import SPECS, evaluate_probe, save_probe

    folder = work / "probes"
    metrics = {}
    for name in SPECS:
        meta = folder / f"{name}.json"
        if not meta.exists():
            net = train_probe(cfg, work, name, vae)
            save_probe(net, name, folder, evaluate_probe(net, name, seed=cfg.seed + 1000))
        metrics[name] = json.loads(meta.read_text())["accuracy"]
    return metrics


def train_probe(cfg: BuildConfig, work: Path, name: str, vae):
    """Probe `name` trained on fresh renders (on the CPU, as it always was: the renders are the cost)."""
    from limner.world.probes import SPECS, ProbeNet, make_set, vae_round_trip

    spec = SPECS[name]
    n_train = min(cfg.probe_train_size, spec.train_size or cfg.probe_train_size)
    images, labels = make_set(name, n_train, cfg.seed)
    round_trips = vae_round_trip(vae, images) if spec.generator_styled else None
    torch.manual_seed(cfg.seed)
    net = ProbeNet(spec.heads())
    settings = stage_config(
        cfg,
        torch.device("cpu"),
        max_steps=cfg.probe_steps,
        batch_size=PROBE_BATCH,
        learning_rate=PROBE_LR,
        weight_decay=PROBE_WEIGHT_DECAY,
        lr_floor=0.0,
        max_grad_norm=0.0,
        seed=cfg.seed,
    )
    train(
        ProbeTask(net),
        probe_batches(spec, images, labels, round_trips, PROBE_BATCH),
        settings,
        work / f"probe_{name}",
        desc=f"probe {name}",
    )
    return net.eval()


def stage_losses(work: Path) -> dict[str, list[float]]:
    """Each training stage's mean loss over its first and last tenth of steps (from its train_log.csv)."""
    summary = {}
    for path in sorted(work.glob("*/train_log.csv")):
        with open(path, newline="") as f:
            losses = [float(row["loss"]) for row in csv.DictReader(f)]
        if losses:
            k = max(1, len(losses) // 10)
            summary[path.parent.name] = [round(sum(losses[:k]) / k, 4), round(sum(losses[-k:]) / k, 4)]
    return summary


def build(out: Path, work: Path, cfg: BuildConfig, device: str = "auto") -> dict:
    """Runs every stage not yet done and writes the world folder `out` (base/: a diffusers folder,
    probes/: the probes). Returns the build record."""
    from limner.models.loading import resolve_device

    dev = resolve_device(device)
    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "build.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"config": asdict(cfg), "seconds": {}}
    if record["config"] != asdict(cfg):
        raise LimnerError(
            f"--work {work} holds a build with another configuration; use another --work folder or delete it"
        )
    if any(work.glob("*.ckpt")):  # its cached latents are of a VAE this build would train anew
        raise LimnerError(
            f"--work {work} holds checkpoints of an older build (STAGE.ckpt), which this one cannot resume; "
            "use another --work folder or delete it"
        )

    def timed(name, fn, *args, **kwargs):
        t0 = time.time()
        result = fn(*args, **kwargs)
        record["seconds"][name] = round(record["seconds"].get(name, 0) + time.time() - t0, 1)
        write_json_atomic(record_path, record)
        return result

    torch.manual_seed(cfg.seed)
    tokenizer = stack.build_tokenizer()
    images, captions = timed("data", stage_data, cfg, work)
    text_encoder, image_encoder, text_projection, logit_scale = timed(
        "clip", stage_clip, cfg, work, images, captions, tokenizer, dev
    )
    vae = timed("vae", stage_vae, cfg, work, images, dev)

    def cached_latents(name: str, images) -> dict:
        path = work / f"{name}.pt"
        if not path.exists():
            save_tensors(dict(zip(("mean", "std"), timed(name, encode_latents, vae, images, dev))), path)
        return load_tensors(path)

    lat = cached_latents("latents", images)
    scaling = float(1.0 / (lat["mean"].float().std()))
    vae.register_to_config(scaling_factor=scaling)
    unet = timed(
        "unet",
        stage_unet,
        cfg,
        work,
        "unet",
        cfg.unet_lr,
        cfg.unet_warmup,
        cfg.unet_steps,
        cfg.seed + 3,
        lat,
        scaling,
        captions,
        tokenizer,
        text_encoder,
        dev,
    )
    if cfg.instance_steps:
        images, captions = timed("data_instances", stage_data, cfg, work, "instances", cfg.instance_rate)
        lat = cached_latents("latents_instances", images)
        unet = timed(
            "instances",
            stage_unet,
            cfg,
            work,
            "instances",
            cfg.instance_lr,
            cfg.instance_warmup,
            cfg.instance_steps,
            cfg.seed + 4,
            lat,
            scaling,
            captions,
            tokenizer,
            text_encoder,
            dev,
            start="unet",
        )
        if cfg.instance_restart_steps:
            unet = timed(
                "instances_restart",
                stage_unet,
                cfg,
                work,
                "instances_restart",
                cfg.instance_lr / 2,
                cfg.instance_warmup,
                cfg.instance_restart_steps,
                cfg.seed + 5,
                lat,
                scaling,
                captions,
                tokenizer,
                text_encoder,
                dev,
                start="instances",
            )
    record["probes"] = timed("probes", stage_probes, cfg, work, vae)
    timed(
        "export",
        export_pipeline,
        out / "base",
        tokenizer,
        text_encoder.cpu(),
        image_encoder.cpu(),
        text_projection.cpu(),
        logit_scale.cpu(),
        vae.cpu(),
        unet.cpu(),
    )
    shutil.copytree(work / "probes", out / "probes", dirs_exist_ok=True)
    record["loss"] = stage_losses(work)
    record["device"] = str(dev)
    record["torch"] = torch.__version__
    write_json_atomic(out / "base" / "build.json", record)
    write_json_atomic(record_path, record)
    return record
