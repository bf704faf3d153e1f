"""What a method hands the trainer: `TrainingTask` (its modules, trainable parameters and loss), and
the `TrainLog` the trainer hands back. The interface between methods and the loop, kept apart so a
method reads it without the loop's dependencies."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class TrainingTask(ABC):
    """What a method trains: its modules, its trainable parameters and its loss."""

    # set by `train` before the first step: the accelerate-wrapped modules() (forward passes go through them,
    # so that gradients are synchronised across processes) and the run's accelerate.Accelerator
    wrapped: dict[str, nn.Module]
    accelerator: Any

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

    def before_clipping(self) -> None:  # noqa: B027 - optional hook
        """Once an optimizer step's gradients are complete (accumulated, and synchronised across processes),
        before they are clipped and applied. E.g. Textual Inversion zeroes the gradients of every embedding
        row but the new tokens', which would otherwise count in the clipping norm."""

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
    curve: list[dict] = field(default_factory=list)  # {"step", "seconds", "loss", "lr"}
    validation: list[dict] = field(default_factory=list)  # {"step", "seconds", "score"} when validation scores images
    resumed_from: int | None = None
    num_processes: int = 1
    flops_per_step: float | None = (
        None  # one optimizer step's model FLOPs in one process, counted once (training/throughput.py)
    )
    peak_tflops: float | None = None  # what MFU was measured against
