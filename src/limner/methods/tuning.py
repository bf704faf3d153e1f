"""The tuning family's template: every method that personalizes by training runs the same recipe.

    settings -> prepare (task, batches) -> train (the shared loop) -> save (the method's formats) -> limner.json

A tuning method fills in three hooks: `configure` (its settings, validated), `prepare` (a
`TrainingTask` and a batch sampler for the subjects) and `save` (its weights in their interoperable
formats, returning the manifest's method-specific fields). The loop, validation images, the main
process's writes under the disk guard and the concept manifest are written once, here.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from limner.concepts import write_concept
from limner.errors import LimnerError
from limner.io import disk_guard
from limner.methods.base import Method, Score
from limner.methods.settings import with_recipe, with_settings
from limner.subject import Subject
from limner.training import TrainConfig, TrainingTask, is_main_process, make_validator, train
from limner.training.config import trainer_settings
from limner.values import typed_replace

if TYPE_CHECKING:
    from limner.models.loading import Base


@dataclass
class TuningRun:
    """What `prepare` sets up for one training run."""

    task: TrainingTask
    next_batch: Callable[
        [torch.Generator], dict
    ]  # draws one batch from the generator the trainer seeds and checkpoints
    validation_prompts: list[str]  # drawn during training (--set validate_every=N)
    description: str  # the progress bar's label
    state: dict[str, Any]  # what `save` needs besides the task (tokens, prompts)


class TuningMethod(Method):
    family = "tuning"
    artifact = "the weights"  # what `save` writes, for the full-disk message

    def personalize(
        self, base: Base, subject: Subject | list[Subject], out: Path, *, score: Score | None = None, **overrides: Any
    ) -> Path:
        subjects = list(subject) if isinstance(subject, (list, tuple)) else [subject]
        if len(subjects) > 1 and not self.capabilities.joint:
            raise LimnerError(
                f"{len(subjects)} subjects given; {self.name} trains one at a time (Custom Diffusion trains several "
                "jointly)"
            )
        cfg = self.configure(overrides, len(subjects))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        run = self.prepare(base, subjects, cfg)
        t0 = time.perf_counter()
        validate = make_validator(base, run.validation_prompts, out, score=score)
        log = train(run.task, run.next_batch, cfg.train, out, desc=run.description, validate=validate)
        base.pipe.unet.eval()
        if not is_main_process():
            return out
        with disk_guard(f"{self.artifact} in {out}"):
            fields = self.save(base, subjects, cfg, run, out)
        write_concept(out, self.name, subjects[0], base, log, time.perf_counter() - t0, **fields)
        return out

    def configure(self, overrides: dict, num_subjects: int = 1) -> Any:
        """The settings for a run: the defaults with `overrides` applied (validated by the settings
        dataclass; `recipe=NAME` expanded), and the trainer's defaults where no `train` was given, with any
        trainer settings among the overrides (`max_steps=50`) applied. A given `train` is taken whole: the
        command line builds it with the recipe's and the flags' trainer settings already in it."""
        train_given = overrides.get("train") is not None
        train_settings, overrides = trainer_settings(with_recipe(self, overrides, num_subjects))
        cfg = with_settings(self.default_config(), overrides, self.name)
        if not train_given:
            defaults = cfg.train if cfg.train is not None else self.train_defaults(cfg, num_subjects)
            cfg.train = typed_replace(defaults, train_settings, self.name)
        return cfg

    def train_defaults(self, cfg: Any, num_subjects: int) -> TrainConfig:
        """The trainer's defaults for these settings."""
        return self.default_train_config(num_subjects)

    @abstractmethod
    def prepare(self, base: Base, subjects: list[Subject], cfg: Any) -> TuningRun:
        """Sets the base up for training (new tokens, adapters) and returns the task and its batches."""

    @abstractmethod
    def save(self, base: Base, subjects: list[Subject], cfg: Any, run: TuningRun, out: Path) -> dict[str, Any]:
        """Writes the trained weights into `out`; returns the manifest's method-specific fields."""
