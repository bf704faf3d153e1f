"""Writing a pipeline folder that plain diffusers loads, small and without half-written states."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def diffusers_quiet() -> Iterator[None]:
    """diffusers' logging at error level for the duration."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def save_pipeline(pipe, out: Path, dtype: torch.dtype = torch.float16) -> None:
    """Saves `pipe` as a diffusers folder with weights in `dtype` (safetensors), written under a
    temporary name and renamed. The pipeline's own dtype is restored afterwards."""
    out = Path(out)
    original = pipe.unet.dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # the weights are written in `dtype` on purpose: diffusers' warning about modules to keep in fp32
        # (SD has none), which every whole-pipeline cast prints, is held back
        with diffusers_quiet():
            pipe.to(dtype=dtype)
        pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        with diffusers_quiet():
            pipe.to(dtype=original)
    # transformers loads a checkpoint in the dtype its config names; say float32 so that plain
    # `from_pretrained(folder)` gets one dtype in every component (the weights stay small)
    for config in tmp.glob("*/config.json"):
        text = config.read_text()
        if '"dtype": "float16"' in text and (config.parent / "model.safetensors").exists():
            config.write_text(text.replace('"dtype": "float16"', '"dtype": "float32"'))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
