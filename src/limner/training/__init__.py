"""One training loop for every method that tunes weights or embeddings.

A method describes *what* it trains as a `TrainingTask` (its trainable modules and parameters, and
its loss on a batch); `train` does the rest: accelerate (devices, mixed precision, gradient
accumulation, several processes under `accelerate launch`), the optimizer and learning-rate
schedule (warm-up, cosine to a floor), an EMA of the trained parameters, checkpoints with exact
resume, CSV logs and a progress bar with time per step and model FLOP utilisation. The world build's
long pretraining stages run on it too.

The package holds one concern per module (config, task, losses, checkpoints, validation, throughput, loop);
this file re-exports their public names, so `from limner.training import train` keeps working.
"""

from limner.training.checkpoints import find_checkpoint, load_checkpoint, save_checkpoint, trained_state
from limner.training.config import TrainConfig, split_train_settings
from limner.training.loop import (
    HALF,
    NORMS,
    FrozenInHalf,
    finish_processes,
    is_main_process,
    lr_lambda,
    train,
    write_csv,
)
from limner.training.losses import denoising_loss, drop_conditioning, min_snr_weights, noise_scheduler
from limner.training.task import TrainingTask, TrainLog
from limner.training.validation import make_validator

__all__ = [
    "HALF",
    "NORMS",
    "FrozenInHalf",
    "TrainConfig",
    "TrainLog",
    "TrainingTask",
    "denoising_loss",
    "drop_conditioning",
    "find_checkpoint",
    "finish_processes",
    "is_main_process",
    "load_checkpoint",
    "lr_lambda",
    "make_validator",
    "min_snr_weights",
    "noise_scheduler",
    "save_checkpoint",
    "split_train_settings",
    "train",
    "trained_state",
    "write_csv",
]
