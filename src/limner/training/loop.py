"""The training loop: accelerate (devices, mixed precision, gradient accumulation, several
processes), the optimizer and learning-rate schedule (warm-up, cosine to a floor), an optional EMA of
the trained parameters, frozen weights in half precision, checkpoints and validation at their steps,
time per step and model FLOP utilisation, and the CSV log. Everything else the loop needs lives beside
it. It serves short tuning runs and long pretraining (the world build's stages) alike."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from limner.errors import LimnerError
from limner.io import disk_guard, written_atomically
from limner.progress import is_quiet
from limner.training.checkpoints import (
    DataPosition,
    data_positions,
    find_checkpoint,
    load_checkpoint,
    rng_states,
    save_checkpoint,
)
from limner.training.config import TrainConfig
from limner.training.task import TrainingTask, TrainLog
from limner.training.throughput import Throughput, default_peak_tflops


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


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The learning rate's factor at each step: a linear warm-up, then constant or a cosine from 1 down
    to cfg.lr_floor."""
    floor = cfg.lr_floor

    def f(step: int) -> float:
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        if cfg.lr_schedule == "cosine":
            t = (step - cfg.lr_warmup_steps) / max(1, cfg.max_steps - cfg.lr_warmup_steps)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0

    return f


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA's decay after optimizer step `step` (from 0): a warm-up, so the early weights fade fast."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: list[torch.Tensor], params: list[nn.Parameter], step: int, decay: float) -> None:
    torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - ema_decay_at(step, decay))


@torch.no_grad()
def swap_in_ema(ema: list[torch.Tensor], params: list[nn.Parameter]) -> None:
    """The average into the trained parameters, at the end of training: what the task saves. The
    trained values themselves stay in the last checkpoint (checkpoints.trained_state)."""
    for v, p in zip(ema, params):
        p.copy_(v)


def clip_gradients(accelerator, params: list[nn.Parameter], max_norm: float) -> None:
    """accelerate's clip_grad_norm_, less its one wasted pass: torch multiplies every gradient by the clipping
    coefficient even when the norm is under the cap and the coefficient is exactly 1 (a full fine-tune's norms
    mostly are: ~3% of its step on the CPU). Same numbers, bit for bit; DeepSpeed, FSDP and XLA keep accelerate's
    own, which they need."""
    from accelerate.utils import DistributedType

    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if not plain or not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6 has no separate pieces
        accelerator.clip_grad_norm_(params, max_norm)
        return
    accelerator.unscale_gradients()  # fp16: the scaler's factor out first, as accelerate does
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    coefficient = max_norm / (total + 1e-6)  # torch's, which it clamps at 1
    if not coefficient >= 1:  # a NaN norm too, which torch spreads to every gradient
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


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
        frozen = {
            id(p): p
            for m in modules
            for sub in m.modules()
            if not isinstance(sub, NORMS)
            for p in sub.parameters(recurse=False)
            if not p.requires_grad and p.is_floating_point()
        }
        self.params = list(frozen.values()) if dtype is not None else []
        self.kept: list[tuple[nn.Parameter, torch.dtype, torch.Tensor | None]] | None = (
            None  # decided at the first halve()
        )

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


def _accelerator(cfg: TrainConfig, modules: dict[str, nn.Module], out: Path):
    """The run's Accelerator (its trackers started), with gradient checkpointing switched on where asked."""
    from accelerate import Accelerator

    # on a CPU-only machine `accelerate launch --multi_gpu --num_processes N` runs N gloo processes
    on_cpu = next(next(iter(modules.values())).parameters()).device.type == "cpu"
    _forget_accelerator_settings()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=on_cpu,
        log_with=_trackers() or None,
        project_dir=str(out / "logs"),
    )
    if accelerator.log_with:
        accelerator.init_trackers("limner")
    if cfg.gradient_checkpointing:
        for m in modules.values():
            if hasattr(m, "enable_gradient_checkpointing"):
                m.enable_gradient_checkpointing()
            elif hasattr(m, "gradient_checkpointing_enable"):
                m.gradient_checkpointing_enable()
    return accelerator


def train(
    task: TrainingTask,
    next_batch: Callable[[torch.Generator], dict],
    cfg: TrainConfig,
    out: Path,
    desc: str = "train",
    validate: Callable[[int], float | None] | None = None,
    data: DataPosition | None = None,
) -> TrainLog:
    """Runs cfg.max_steps optimizer steps of task.loss on batches from next_batch(generator).

    The generator that draws batches and noise is seeded from cfg.seed and the process index, saved
    (each process's) in every checkpoint and restored on resume, so a resumed run continues exactly as the
    uninterrupted run would have. Where next_batch reads a stream (limner.data), pass it as `data`: its
    position is saved beside the generators and restored before the first step, so the resumed run reads
    the samples the uninterrupted one would have. next_batch must take from it only what each step uses
    (no read-ahead), or the saved position runs ahead of the training. With cfg.ema_decay, the task's
    trainable parameters hold their EMA when this returns (validation during training draws with the trained
    values)."""
    modules = task.modules()
    out.mkdir(parents=True, exist_ok=True)
    accelerator = _accelerator(cfg, modules, out)
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
        # the schedule counts optimizer steps, stepped by the loop once per step taken: accelerate's prepared
        # scheduler steps once per process at each optimizer step (it assumes the batches of N processes
        # stand for N steps of one), so with 2 processes a cosine reached its end halfway
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        names = list(modules)
        prepared = accelerator.prepare(*modules.values(), optimizer)
        wrapped, optimizer = dict(zip(names, prepared[:-1])), prepared[-1]
        task.wrapped = wrapped  # the accelerate-wrapped modules, for the task's forward passes
        task.accelerator = accelerator
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + accelerator.process_index)
        # the average starts from the weights training starts from; fp32 like the trained parameters
        ema = [p.detach().clone() for p in params] if cfg.ema_decay else None
        speed = Throughput(cfg.peak_tflops or default_peak_tflops(accelerator.device, accelerator.mixed_precision))
        log = TrainLog(num_processes=accelerator.num_processes, peak_tflops=speed.peak_tflops)
        start = 0
        ckpt = find_checkpoint(out, cfg.resume)
        if ckpt is not None:
            start, meta = load_checkpoint(
                ckpt,
                task,
                optimizer,
                scheduler,
                generator,
                cfg,
                ema=ema,
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
                scaler=accelerator.scaler,
                data=data,
            )
            log.curve, log.validation = meta["curve"], meta.get("validation", [])
            log.resumed_from = start
            if start < cfg.max_steps and accelerator.is_main_process:
                tqdm.write(f"[{desc}] resuming at step {start}/{cfg.max_steps} from {ckpt}")
        csv_path = out / "train_log.csv"
        t0 = time.perf_counter() - (log.curve[-1]["seconds"] if log.curve else 0.0)
        bar = tqdm(
            range(start, cfg.max_steps),
            initial=start,
            total=cfg.max_steps,
            desc=desc,
            disable=not accelerator.is_main_process or is_quiet(),  # limner --quiet hides it as every limner bar
            mininterval=1,
        )
        for step in bar:
            t_step = time.perf_counter()
            lr = scheduler.get_last_lr()[0]  # what this step's update uses
            for _ in range(cfg.gradient_accumulation_steps):
                with accelerator.accumulate(*wrapped.values()):
                    with speed.counting():
                        with accelerator.autocast():
                            loss = task.loss(next_batch(generator), generator)
                        accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        task.before_clipping()
                        if cfg.max_grad_norm:
                            clip_gradients(accelerator, params, cfg.max_grad_norm)
                    optimizer.step()
                    # as accelerate's own scheduler did: not after a step it reports that fp16's loss scaler
                    # skipped (it reports none with the fused AdamW, whose kernel skips the update itself)
                    if accelerator.sync_gradients and not optimizer.step_was_skipped:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            task.after_optimizer_step()
            if ema is not None:
                update_ema(ema, params, step, cfg.ema_decay)
            loss_value = (
                accelerator.gather(loss.detach().float().reshape(1)).mean().item()
            )  # .item() waits for the device
            speed.step_done(time.perf_counter() - t_step)
            log.curve.append(
                {
                    "step": step + 1,
                    "seconds": round(time.perf_counter() - t0, 6),
                    "loss": round(loss_value, 6),
                    "lr": lr,
                }
            )
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", **speed.postfix())
            if accelerator.log_with:
                accelerator.log({"loss": loss_value, "lr": lr, **speed.scalars()}, step=step + 1)
            done = step + 1 == cfg.max_steps
            if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or done:
                rng = rng_states(accelerator, generator)  # all processes take part
                positions = data_positions(accelerator, data) if data is not None else None
                if accelerator.is_main_process:
                    log.flops_per_step = speed.flops_per_step
                    with disk_guard(f"a checkpoint in {out / 'checkpoints'}"):
                        save_checkpoint(
                            out,
                            step + 1,
                            task,
                            optimizer,
                            scheduler,
                            rng,
                            cfg,
                            log,
                            ema=ema,
                            scaler=accelerator.scaler,
                            data=positions,
                        )
                        write_csv(csv_path, log.curve, log.flops_per_step, log.peak_tflops)
            if (
                validate
                and accelerator.is_main_process
                and cfg.validate_every
                and ((step + 1) % cfg.validate_every == 0 or done)
            ):
                t_validate = time.perf_counter()
                frozen.restore()  # validation draws with the weights the pipeline had
                value = validate(step + 1)
                frozen.halve()
                t0 += (
                    time.perf_counter() - t_validate
                )  # the clock stops while validating: reported times are training times
                if value is not None:
                    log.validation.append(
                        {"step": step + 1, "seconds": log.curve[-1]["seconds"], "score": round(value, 4)}
                    )
    finally:
        frozen.restore()
    if ema is not None:
        swap_in_ema(ema, params)
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        accelerator.end_training()
    log.flops_per_step = speed.flops_per_step
    log.steps = cfg.max_steps
    log.seconds = log.curve[-1]["seconds"] if log.curve else 0.0
    return log


def write_csv(
    path: Path, curve: list[dict], flops_per_step: float | None = None, peak_tflops: float | None = None
) -> None:
    """step, seconds (of training, validation left out), loss, the learning rate the step used (blank in rows
    logged before it was), then each step's own time and, where its FLOPs were counted, the TFLOP/s achieved
    and the MFU against `peak_tflops` (blank where unknown)."""
    with written_atomically(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "seconds", "loss", "lr", "step_seconds", "tflops", "mfu"])
        w.writeheader()
        previous = 0.0
        for row in curve:
            dt = row["seconds"] - previous
            previous = row["seconds"]
            tflops = flops_per_step / dt / 1e12 if flops_per_step and dt > 0 else None
            mfu = tflops / peak_tflops if tflops is not None and peak_tflops else None
            w.writerow(row | {"step_seconds": _rounded(dt), "tflops": _rounded(tflops), "mfu": _rounded(mfu)})


def _rounded(x: float | None) -> float | str:
    return "" if x is None else float(f"{x:.4g}")
