"""Checkpoints: trainable values in safetensors, optimizer and generator state as plain tensors, so
that a resumed run continues exactly as the uninterrupted run would have."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from limner.errors import LimnerError
from limner.training.config import TrainConfig
from limner.training.task import TrainingTask, TrainLog


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
