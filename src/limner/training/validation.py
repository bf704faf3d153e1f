"""Validation images (and optionally a score) during training: drawn with the pipeline as it is at
that step. Apart from the loop because it is the trainer's only tie to generation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def make_validator(
    base,
    prompts: list[str],
    out: Path,
    images_per_prompt: int = 2,
    steps: int = 20,
    score: Callable[[list], float] | None = None,
) -> Callable[[int], float | None]:
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
