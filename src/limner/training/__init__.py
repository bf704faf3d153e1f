"""One training loop for every method that tunes weights or embeddings.

A method describes *what* it trains as a `TrainingTask` (its trainable modules and parameters, and
its loss on a batch); `train` does the rest: accelerate (devices, mixed precision, gradient
accumulation, several processes under `accelerate launch`), the optimizer and learning-rate
schedule, checkpoints with exact resume, CSV logs and a progress bar.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from limner.errors import LimnerError
from limner.io import disk_guard, written_atomically


@dataclass
class TrainConfig:
    max_steps: int = 400
    batch_size: int = 4
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    weight_decay: float = 1e-2
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    # mirror images of the references as extra training data. Off by default, as in kohya (--flip_aug)
    # and diffusers' DreamBooth and Custom Diffusion scripts (--hflip): a subject is often not symmetric
    # (a logo, text, a face turned one way), and its mirror image is another subject. The world agrees:
    # a left/right two-tone subject mirrored reads as another one, and without flips the mean
    # subject fidelity of DreamBooth rose from 0.576 to 0.683, LoRA 0.509 -> 0.551, TI 0.376 -> 0.413
    # (docs/README.md).
    flip: bool = False
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None  # None or 0: every timestep weighs the same
    validate_every: int = 0  # 0: no validation images during training
    resume: str | None = None  # "latest" or a checkpoint folder


def split_train_settings(cfg: TrainConfig, settings: dict) -> tuple[TrainConfig, dict]:
    """(cfg with the settings that name trainer fields applied, the remaining method settings): one
    flat list of key=value settings on the command line reaches both."""
    names = {f.name for f in fields(TrainConfig)}
    return replace(cfg, **{k: v for k, v in settings.items() if k in names}), {k: v for k, v in settings.items() if k not in names}


class TrainingTask(ABC):
    """What a method trains: its modules, its trainable parameters and its loss."""

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """The modules that hold trainable parameters (wrapped by accelerate)."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]: ...

    @abstractmethod
    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor: ...

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules the loss runs but nothing in them trains (e.g. Textual Inversion's UNet): held in half
        precision under mixed precision, as the frozen parts of modules() are."""
        return {}

    def after_optimizer_step(self) -> None:  # noqa: B027 - optional hook
        """E.g. Textual Inversion restores every embedding row but the new tokens'."""

    @abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained values, for checkpoints (small: only what is trained)."""

    @abstractmethod
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class TrainLog:
    steps: int = 0
    seconds: float = 0.0
    curve: list[dict] = field(default_factory=list)  # {"step", "seconds", "loss"}
    validation: list[dict] = field(default_factory=list)  # {"step", "seconds", "score"} when validation scores images
    resumed_from: int | None = None
    num_processes: int = 1


def is_main_process() -> bool:
    """True in the one process that writes artifacts (all processes train under `accelerate launch`)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def finish_processes() -> None:
    """Under `accelerate launch`: wait until the main process has written the artifacts, then close
    the process group, so no process exits with gloo's threads still running (an abort at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The denoising loss every tuning method shares
# --------------------------------------------------------------------------------------------


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


def denoising_loss(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator,
                   noise_offset: float = 0.0, min_snr_gamma: float | None = None, mask: torch.Tensor | None = None,
                   reduction: str = "mean", **unet_kwargs) -> torch.Tensor:
    """Epsilon (or v) prediction MSE at random timesteps, with optional noise offset, min-SNR weighting
    and a spatial mask (1 where the loss counts). reduction='none' gives one value per sample."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator).to(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, cond, **unet_kwargs).sample.float()
    target = noise.float() if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t).float()
    err = F.mse_loss(pred, target, reduction="none")
    if mask is not None:
        m = F.interpolate(mask.float(), size=err.shape[-2:], mode="nearest").to(err)
        per_sample = (err * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * err.shape[1]).clamp(min=1)
    else:
        per_sample = err.mean(dim=(1, 2, 3))
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, t, min_snr_gamma)
    return per_sample if reduction == "none" else per_sample.mean()


# --------------------------------------------------------------------------------------------
# Checkpoints: trainable values in safetensors, optimizer and generator state as plain tensors
# --------------------------------------------------------------------------------------------


def _checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is still named step-N.tmp)."""
    found = [p for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(out: Path, step: int, task: TrainingTask, optimizer, scheduler, generator: torch.Generator,
                    cfg: TrainConfig, log: TrainLog) -> Path:
    from safetensors.torch import save_file

    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in task.trainable_state().items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    (tmp / "checkpoint.json").write_text(json.dumps({"step": step, "config": _resume_key(cfg), "curve": log.curve,
                                                      "validation": log.validation}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoint_dirs(out)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _resume_key(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint."""
    d = asdict(cfg)
    for k in ("resume", "checkpoint_every", "keep_checkpoints", "max_steps", "validate_every"):
        d.pop(k)
    return d


def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = _checkpoint_dirs(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "checkpoint.json").exists():
        raise LimnerError(f"--resume {resume}: not a limner checkpoint folder (no checkpoint.json); use 'latest' or a "
                          f"folder under {out / 'checkpoints'}")
    return path


def load_checkpoint(path: Path, task: TrainingTask, optimizer, scheduler, generator: torch.Generator, cfg: TrainConfig) -> tuple[int, dict]:
    from safetensors.torch import load_file

    meta = json.loads((path / "checkpoint.json").read_text())
    if meta["config"] != _resume_key(cfg):
        changed = sorted(k for k in meta["config"] if meta["config"][k] != _resume_key(cfg).get(k))
        raise LimnerError(f"checkpoint {path} was written with other settings ({', '.join(changed)}); resume with the same "
                          "settings, or start a new run in another output folder")
    task.load_trainable_state(load_file(str(path / "trainable.safetensors")))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return meta["step"], meta


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        if cfg.lr_schedule == "cosine":
            t = (step - cfg.lr_warmup_steps) / max(1, cfg.max_steps - cfg.lr_warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0

    return f


def make_validator(base, prompts: list[str], out: Path, images_per_prompt: int = 2, steps: int = 20,
                   score: Callable[[list], float] | None = None) -> Callable[[int], float | None]:
    """Validation images during training: a grid per call in out/validation/, made with the
    pipeline as it is at that step (no gradients, and GPU memory freed afterwards). With `score`
    (e.g. the world's subject probe), each call also returns a number, logged against time."""

    def validate(step: int) -> float | None:
        from limner.generation import GenerationSettings, generate, make_grid

        images = []
        for p in prompts:
            s = GenerationSettings(p, num_images=images_per_prompt, seed=0, steps=steps, batch_size=images_per_prompt)
            images += generate(base, s).images
        (out / "validation").mkdir(parents=True, exist_ok=True)
        make_grid(images, cols=images_per_prompt).save(out / "validation" / f"step-{step:06d}.png")
        base.pipe.unet.train()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return float(score(images)) if score else None

    return validate


def _trackers() -> list[str]:
    import importlib.util

    return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


class FrozenInHalf:
    """Under mixed precision the forward pass runs in half precision anyway, so the weights that do not
    train are held in half precision too, as diffusers' example scripts hold them: half their memory and
    no cast per step (LoRA in fp16 at SD 1.5's size: peak 10.0 -> 7.9 GB, benchmarks/cuda). The trained
    parameters stay fp32, and so do normalisation layers: they are tiny, and a CPU's autocast leaves them
    to meet fp32 activations. restore() gives the weights back exactly: where casting back would not (bf16,
    or fp16 of weights stored in fp32), a CPU copy is kept, and a weight on the CPU that would need one
    stays as it is. Validation restores them, so it draws at the memory cost training had before this.
    dtype None: nothing changes."""

    def __init__(self, dtype: torch.dtype | None, modules: Iterable[nn.Module]):
        self.dtype, self.halved = dtype, False
        frozen = {id(p): p for m in modules for sub in m.modules() if not isinstance(sub, NORMS)
                  for p in sub.parameters(recurse=False) if not p.requires_grad and p.is_floating_point()}
        self.params = list(frozen.values()) if dtype is not None else []
        self.kept: list[tuple[nn.Parameter, torch.dtype, torch.Tensor | None]] | None = None  # decided at the first halve()

    def _plan(self, p: nn.Parameter) -> tuple[nn.Parameter, torch.dtype, torch.Tensor | None] | None:
        """(p, its dtype, a CPU copy where casting back would round it), or None to leave p as it is."""
        if p.dtype.itemsize <= 2:  # already half: nothing to save
            return None
        if torch.equal(p.data.to(self.dtype).to(p.dtype), p.data):
            return p, p.dtype, None
        if p.device.type == "cpu":
            return None  # a copy beside the half weights would cost more memory than it saves
        return p, p.dtype, p.data.to("cpu", copy=True)

    def halve(self) -> None:
        if self.kept is None:
            self.kept = [entry for p in self.params if (entry := self._plan(p)) is not None]
        self.halved = True
        for p, _, _ in self.kept:
            p.data = p.data.to(self.dtype)

    def restore(self) -> None:
        if not self.halved:
            return
        for p, dtype, copy in self.kept:
            p.data = p.data.to(dtype) if copy is None else copy.to(p.device, copy=True)  # the copy stays pristine
        self.halved = False


def _forget_accelerator_settings() -> None:
    """accelerate keeps one state per process and refuses a second Accelerator with another mixed precision
    or device, so a process that trains twice (a notebook, the eval bench's rows, `limner bench`) would
    fail on its second run. Each run starts from a fresh state; a distributed launch keeps its process group."""
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state or PartialState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=not PartialState().use_distributed)


def train(task: TrainingTask, next_batch: Callable[[torch.Generator], dict], cfg: TrainConfig, out: Path,
          desc: str = "train", validate: Callable[[int], float | None] | None = None) -> TrainLog:
    """Runs cfg.max_steps optimizer steps of task.loss on batches from next_batch(generator).

    The generator that draws batches and noise is seeded from cfg.seed and the process index, saved
    in every checkpoint and restored on resume, so a resumed run continues exactly as the
    uninterrupted run would have."""
    from accelerate import Accelerator

    modules = task.modules()
    # on a CPU-only machine `accelerate launch --multi_gpu --num_processes N` runs N gloo processes
    on_cpu = next(next(iter(modules.values())).parameters()).device.type == "cpu"
    out.mkdir(parents=True, exist_ok=True)
    _forget_accelerator_settings()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              cpu=on_cpu, log_with=_trackers() or None, project_dir=str(out / "logs"))
    if accelerator.log_with:
        accelerator.init_trackers("limner")
    if cfg.gradient_checkpointing:
        for m in modules.values():
            if hasattr(m, "enable_gradient_checkpointing"):
                m.enable_gradient_checkpointing()
            elif hasattr(m, "gradient_checkpointing_enable"):
                m.gradient_checkpointing_enable()
    params = task.trainable_parameters()
    if not params:
        raise LimnerError("nothing to train: the method left no parameter trainable")
    # accelerate runs no autocast for fp16 on a CPU: then the frozen weights stay as they are
    half = HALF.get(accelerator.mixed_precision) if accelerator.native_amp else None
    frozen = FrozenInHalf(half, [*modules.values(), *task.frozen_modules().values()])
    try:
        frozen.halve()
        # the fused kernel (CPU and CUDA) takes a third of the per-tensor loop's time: ~13% of a full UNet
        # fine-tune's step on a CPU
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        names = list(modules)
        prepared = accelerator.prepare(*modules.values(), optimizer, scheduler)
        wrapped, optimizer, scheduler = dict(zip(names, prepared[:-2])), prepared[-2], prepared[-1]
        task.wrapped = wrapped  # the accelerate-wrapped modules, for the task's forward passes
        task.accelerator = accelerator
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + accelerator.process_index)
        log = TrainLog(num_processes=accelerator.num_processes)
        start = 0
        ckpt = find_checkpoint(out, cfg.resume)
        if ckpt is not None:
            start, meta = load_checkpoint(ckpt, task, optimizer, scheduler, generator, cfg)
            log.curve, log.validation = meta["curve"], meta.get("validation", [])
            log.resumed_from = start
        csv_path = out / "train_log.csv"
        t0 = time.perf_counter() - (log.curve[-1]["seconds"] if log.curve else 0.0)
        bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=desc, disable=not accelerator.is_main_process,
                   mininterval=1)
        for step in bar:
            for _ in range(cfg.gradient_accumulation_steps):
                with accelerator.accumulate(*wrapped.values()):
                    with accelerator.autocast():
                        loss = task.loss(next_batch(generator), generator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            task.after_optimizer_step()
            loss_value = accelerator.gather(loss.detach().float().reshape(1)).mean().item()
            log.curve.append({"step": step + 1, "seconds": round(time.perf_counter() - t0, 3), "loss": round(loss_value, 6)})
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if accelerator.log_with:
                accelerator.log({"loss": loss_value, "lr": scheduler.get_last_lr()[0]}, step=step + 1)
            done = step + 1 == cfg.max_steps
            if accelerator.is_main_process and ((cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or done):
                with disk_guard(f"a checkpoint in {out / 'checkpoints'}"):
                    save_checkpoint(out, step + 1, task, optimizer, scheduler, generator, cfg, log)
                    write_csv(csv_path, log.curve)
            if validate and accelerator.is_main_process and cfg.validate_every and ((step + 1) % cfg.validate_every == 0 or done):
                t_validate = time.perf_counter()
                frozen.restore()  # validation draws with the weights the pipeline had
                value = validate(step + 1)
                frozen.halve()
                t0 += time.perf_counter() - t_validate  # the clock stops while validating: reported times are training times
                if value is not None:
                    log.validation.append({"step": step + 1, "seconds": log.curve[-1]["seconds"], "score": round(value, 4)})
    finally:
        frozen.restore()
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        accelerator.end_training()
    log.steps = cfg.max_steps
    log.seconds = log.curve[-1]["seconds"] if log.curve else 0.0
    return log


def write_csv(path: Path, curve: list[dict]) -> None:
    with written_atomically(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "seconds", "loss"])
        w.writeheader()
        w.writerows(curve)
