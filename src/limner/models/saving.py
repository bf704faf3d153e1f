"""Writing a pipeline folder that plain diffusers loads, small and without half-written states."""

from __future__ import annotations

import json
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
    make_portable(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# classes only the newest transformers has, which diffusers writes into model_index.json when it saves a pipeline
# there, and the class every transformers resolves (transformers 5 without torchvision picks the PIL one itself)
PORTABLE_CLASSES = {"CLIPImageProcessorPil": "CLIPImageProcessor"}
# what make_portable changed: the files as they were saved (the fingerprint hashes those) and the files it added
PORTABLE_RECORD = "limner_portable.json"


def make_portable(folder: Path) -> list[str]:
    """Makes a saved pipeline folder load on older stacks too (transformers 4.x with diffusers 0.3x, what many
    users run): model_index.json names classes every transformers has, and each tokenizer saved as tokenizer.json
    only gets the vocab.json and merges.txt that transformers 4's slow CLIPTokenizer reads. Weights and configs
    are untouched; what changed is recorded in PORTABLE_RECORD, so the folder's fingerprint stays what it was.
    Returns the files written."""
    folder = Path(folder)
    record = portable_record(folder)
    index = folder / "model_index.json"
    written: list[str] = []
    if index.is_file():
        text = index.read_text()
        portable = text
        for new_only, everywhere in PORTABLE_CLASSES.items():
            portable = portable.replace(f'"{new_only}"', f'"{everywhere}"')
        if portable != text:
            record["original"].setdefault("model_index.json", text)
            index.write_text(portable)
            written.append("model_index.json")
    for tokenizer_json in sorted(folder.glob("*/tokenizer.json")):
        for name in write_slow_tokenizer_files(tokenizer_json.parent):
            rel = f"{tokenizer_json.parent.name}/{name}"
            record["derived"] = sorted(set(record["derived"]) | {rel})
            written.append(rel)
    if written:
        (folder / PORTABLE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return written


def portable_record(folder: Path) -> dict:
    """What make_portable changed in `folder` (nothing, for a folder it never touched)."""
    path = folder / PORTABLE_RECORD
    record = json.loads(path.read_text()) if path.is_file() else {}
    return {"original": record.get("original", {}), "derived": record.get("derived", [])}


def write_slow_tokenizer_files(folder: Path) -> list[str]:
    """vocab.json and merges.txt of a byte-level BPE tokenizer.json, as transformers' slow tokenizers save them
    (the same vocabulary and merges in their ranked order); nothing where they exist or the model is not BPE."""
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    if model.get("type") != "BPE" or (folder / "vocab.json").exists() or (folder / "merges.txt").exists():
        return []
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
    return ["vocab.json", "merges.txt"]
