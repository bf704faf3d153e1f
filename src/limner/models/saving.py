"""Writing a pipeline folder that plain diffusers loads, small and without half-written states."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def save_pipeline(pipe, out: Path, dtype: torch.dtype = torch.float16) -> None:
    """Saves `pipe` as a diffusers folder with weights in `dtype` (safetensors), written under a
    temporary name and renamed. The pipeline's own dtype is restored afterwards."""
    out = Path(out)
    original = pipe.unet.dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    try:
        # a cast of the whole pipeline makes diffusers warn about modules to keep in fp32 (SD has none);
        # the weights are written in `dtype` on purpose
        diffusers_logging.set_verbosity_error()
        pipe.to(dtype=dtype)
        diffusers_logging.set_verbosity(level)
        pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity_error()
        pipe.to(dtype=original)
        diffusers_logging.set_verbosity(level)
    # transformers loads a checkpoint in the dtype its config names; say float32 so that plain
    # `from_pretrained(folder)` gets one dtype in every component (the weights stay small)
    for config in tmp.glob("*/config.json"):
        text = config.read_text()
        if '"dtype": "float16"' in text and (config.parent / "model.safetensors").exists():
            config.write_text(text.replace('"dtype": "float16"', '"dtype": "float32"'))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
