"""Checkpoints: trainable values (and their EMA, where the run keeps one) in safetensors, optimizer and
generator state as plain tensors (every process's generators: each draws its own batches and noise),
fp16's loss scale, and where the run reads a data stream, each process's position in it (data-rank{N}.json),
so that a resumed run continues exactly as the uninterrupted run would have."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch

from limner.errors import LimnerError
from limner.io import read_tensors
from limner.training.config import TrainConfig
from limner.training.task import TrainingTask, TrainLog

EMA_FILE = "ema.safetensors"


class DataPosition(Protocol):
    """What the loop needs of a data stream to resume it (limner.data's streams are such): its position as a
    JSON-able dict, and a way back to it."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def data_file(rank: int) -> str:
    return f"data-rank{rank}.json"


def _ema_tensors(ema: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    # keyed by position in task.trainable_parameters(): the EMA follows the parameters, which have no names
    # of their own (trainable_state() may name other things, e.g. a single embedding row)
    return {str(i): v.detach().cpu().contiguous() for i, v in enumerate(ema)}


def _checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is still named step-N.tmp)."""
    found = [p for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(
    out: Path,
    step: int,
    task: TrainingTask,
    optimizer,
    scheduler,
    rng: list[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    log: TrainLog,
    ema: list[torch.Tensor] | None = None,
    scaler=None,
    data: list[str] | None = None,
) -> Path:
    """Writes checkpoints/step-N (the trainable values, the EMA's when `ema` is given, optimizer, schedule,
    each process's generator states, `rng` from rng_states, the fp16 loss scaler's state when `scaler` is
    given, and each process's data position, `data` from data_positions, where given) whole or not at all,
    and deletes all but the newest cfg.keep_checkpoints."""
    from safetensors.torch import save_file

    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in task.trainable_state().items()},
        str(tmp / "trainable.safetensors"),
    )
    if ema is not None:
        save_file(_ema_tensors(ema), str(tmp / EMA_FILE))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "rng": rng,
            # the scale and the good steps since it last grew: without them a resumed run starts again from
            # the initial scale, skipping steps on overflow that the uninterrupted run took. One state serves
            # all processes: they unscale the same all-reduced gradients, so they scale alike
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        },
        tmp / "state.pt",
    )
    for rank, position in enumerate(data or []):
        (tmp / data_file(rank)).write_text(position)
    (tmp / "checkpoint.json").write_text(
        json.dumps({"step": step, "config": _resume_key(cfg), "curve": log.curve, "validation": log.validation})
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoint_dirs(out)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rng_states(accelerator, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """The batch and noise generator's state and torch's own, of every process in process order (to be called
    by all processes together). Each process draws its own batches and noise; restoring process 0's state in
    all of them would make every process draw the same batches after a resume."""
    state = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
    if accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    return gather_object([state])


def data_positions(accelerator, data: DataPosition) -> list[str]:
    """Every process's position in its data stream, as JSON text in process order (to be called by all
    processes together, as rng_states). Serialised here, so a position that is not JSON fails in the step
    that wrote it, naming the stream, instead of leaving a checkpoint that cannot be resumed."""
    try:
        position = json.dumps(data.state_dict())
    except (TypeError, ValueError) as e:
        raise LimnerError(
            f"the data stream {type(data).__name__}'s state_dict() is not JSON ({e}): return plain ints, "
            "floats, strings, lists and dicts"
        ) from e
    if accelerator.num_processes == 1:
        return [position]
    from accelerate.utils import gather_object

    return gather_object([position])


def _load_data_position(path: Path, data: DataPosition, process_index: int) -> None:
    file = path / data_file(process_index)
    if not file.is_file():
        raise LimnerError(
            f"checkpoint {path} holds no position in the data stream for process {process_index} (the run that "
            "wrote it read no stream, or fewer processes): resume it as it was started, or start a new run in "
            "another output folder"
        )
    data.load_state_dict(json.loads(file.read_text()))


def _resume_key(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint."""
    d = asdict(cfg)
    for k in ("resume", "checkpoint_every", "keep_checkpoints", "max_steps", "validate_every", "peak_tflops"):
        d.pop(k)
    return d


def _saved_key(meta: dict) -> dict:
    """The resume key a checkpoint was written with. A setting added since then is absent from it: its
    default is what the trainer did before the setting existed (as for eval's cache key)."""
    return _resume_key(TrainConfig()) | meta["config"]


def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = _checkpoint_dirs(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "checkpoint.json").exists():
        raise LimnerError(
            f"--resume {resume}: not a limner checkpoint folder (no checkpoint.json); use 'latest' or a "
            f"folder under {out / 'checkpoints'}"
        )
    return path


def load_checkpoint(
    path: Path,
    task: TrainingTask,
    optimizer,
    scheduler,
    generator: torch.Generator,
    cfg: TrainConfig,
    ema: list[torch.Tensor] | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    scaler=None,
    data: DataPosition | None = None,
) -> tuple[int, dict]:
    """Restores a checkpoint into the task, optimizer, schedule, this process's generator, `ema` (in place),
    the fp16 loss `scaler` and this process's position in the `data` stream, each where given; returns (its
    step, its checkpoint.json)."""
    meta = json.loads((path / "checkpoint.json").read_text())
    saved, wanted = _saved_key(meta), _resume_key(cfg)
    if saved != wanted:
        changed = sorted(k for k in saved if saved[k] != wanted.get(k))
        raise LimnerError(
            f"checkpoint {path} was written with other settings ({', '.join(changed)}); resume with the same "
            "settings, or start a new run in another output folder"
        )
    state = read_tensors(path / "state.pt", allow_pickle=True)  # limner's own pickle, read weights-only
    # written before each process's state was kept: the one process's state at the top level
    rng = state.get("rng") or [{"generator": state["generator"], "torch_rng": state["torch_rng"]}]
    if len(rng) != num_processes:
        raise LimnerError(
            f"checkpoint {path} was written by {len(rng)} process(es), each drawing its own batches and noise; "
            f"this run has {num_processes}: resume with {len(rng)} (accelerate launch --num_processes {len(rng)})"
        )
    if data is not None:  # first: a position that does not fit the stream changes nothing else
        _load_data_position(path, data, process_index)
    task.load_trainable_state(read_tensors(path / "trainable.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    generator.set_state(rng[process_index]["generator"])
    torch.set_rng_state(rng[process_index]["torch_rng"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        saved_ema = read_tensors(path / EMA_FILE)
        if len(saved_ema) != len(ema):
            raise LimnerError(
                f"checkpoint {path} holds the average of {len(saved_ema)} parameters; this run trains {len(ema)}"
            )
        for i, v in enumerate(ema):
            v.copy_(saved_ema[str(i)])
    return meta["step"], meta


def trained_state(out: Path) -> dict[str, torch.Tensor]:
    """The trainable values (not their average) of the newest checkpoint in `out`: where a following run
    starts from (the world build's second UNet stage goes on from the first)."""
    found = _checkpoint_dirs(out)
    if not found:
        raise LimnerError(f"no checkpoint in {out / 'checkpoints'} to start from")
    return read_tensors(found[-1] / "trainable.safetensors")
