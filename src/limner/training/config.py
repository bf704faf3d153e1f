"""The trainer's settings: `TrainConfig`, and the split of one flat list of command-line settings into
the trainer's and a method's. Apart from the loop, so methods and the eval cache key can read the
defaults without importing the trainer's machinery."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from limner.values import bounds, parse_fields, typed_replace

# eval's cache key leaves a setting out at this metadata value (limner.methods.settings.KEY_NEUTRAL, which
# this layer cannot import): a setting added after concepts were cached, at a default that does what the
# trainer did before it existed, keeps those concepts' keys
_KEY_NEUTRAL = "key_neutral"


@dataclass
class TrainConfig:
    max_steps: int = field(default=400, metadata=bounds(at_least=1, flag="--steps"))
    batch_size: int = field(default=4, metadata=bounds(at_least=1, flag="--batch-size"))
    learning_rate: float = field(default=1e-4, metadata=bounds(at_least=0, flag="--lr"))  # 0: a dry run
    lr_warmup_steps: int = field(default=0, metadata=bounds(at_least=0))
    lr_schedule: str = field(default="constant", metadata=bounds(choices=("constant", "cosine")))
    # cosine decays to learning_rate * lr_floor, not to 0 (the world build's UNet uses 0.1)
    lr_floor: float = field(default=0.0, metadata={_KEY_NEUTRAL: 0.0} | bounds(at_least=0, at_most=1))
    weight_decay: float = field(default=1e-2, metadata=bounds(at_least=0))
    gradient_accumulation_steps: int = field(default=1, metadata=bounds(at_least=1))
    max_grad_norm: float = field(default=1.0, metadata=bounds(at_least=0))  # 0: no clipping
    mixed_precision: str = field(
        default="no", metadata=bounds(choices=("no", "fp16", "bf16"), flag="--mixed-precision")
    )
    gradient_checkpointing: bool = False
    seed: int = field(default=0, metadata=bounds(at_least=0, flag="--seed"))
    checkpoint_every: int = field(default=100, metadata=bounds(at_least=0))  # 0: only at the end
    keep_checkpoints: int = field(default=2, metadata=bounds(at_least=1))
    # mirror images of the references as extra training data. Off by default, as in kohya (--flip_aug)
    # and diffusers' DreamBooth and Custom Diffusion scripts (--hflip): a subject is often not symmetric
    # (a logo, text, a face turned one way), and its mirror image is another subject. The world agrees:
    # a left/right two-tone subject mirrored reads as another one, and without flips the mean
    # subject fidelity of DreamBooth rose from 0.576 to 0.683, LoRA 0.509 -> 0.551, TI 0.376 -> 0.413
    # (docs/README.md).
    flip: bool = False
    noise_offset: float = field(default=0.0, metadata=bounds(at_least=0))
    min_snr_gamma: float | None = field(default=None, metadata=bounds(at_least=0))  # None or 0: every timestep alike
    validate_every: int = field(default=0, metadata=bounds(at_least=0))  # 0: no validation images during training
    resume: str | None = None  # "latest" or a checkpoint folder
    # an exponential moving average of the trainable parameters, decay min(ema_decay, (1 + step) / (10 + step))
    # (a warm-up, so the first steps' weights do not linger); kept in checkpoints, and swapped into the
    # trainable parameters when training ends, so a task saves the average (as diffusers' EMAModel.copy_to);
    # validation during training draws with the trained values
    ema_decay: float | None = field(default=None, metadata=bounds(at_least=0, below=1))
    # the peak the progress bar's and train_log.csv's model FLOP utilisation is measured against, in TFLOP/s;
    # None: the device's own (limner.training.throughput.default_peak_tflops). Reporting only: a resumed
    # run may change it
    peak_tflops: float | None = field(default=None, metadata=bounds(above=0))

    def __post_init__(self) -> None:
        parse_fields(self)  # "5" from a manifest or a hand-built config is 5; a bad value fails here, named


def split_train_settings(cfg: TrainConfig, settings: dict) -> tuple[TrainConfig, dict]:
    """(cfg with the settings that name trainer fields applied, the remaining method settings): one
    flat list of key=value settings on the command line reaches both."""
    train, rest = trainer_settings(settings)
    return typed_replace(cfg, train, "the trainer"), rest


def trainer_settings(settings: dict) -> tuple[dict, dict]:
    """(the settings that name trainer fields, the rest) of one flat dict of settings."""
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in settings.items() if k in names}, {k: v for k, v in settings.items() if k not in names}
