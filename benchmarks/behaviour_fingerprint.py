"""A fingerprint of what limner does, for refactors that must not change it.

Trains each tuning method for a few steps on a world subject, generates with each concept (plain,
layout steps, two concepts composed, regions), runs a small eval, and records a digest of every
weight file and every image's pixels, the eval scores and the eval cache keys. Run it at the commit
before a refactor and after it; equal digests mean equal behaviour, to the bit:

    python benchmarks/behaviour_fingerprint.py --out /tmp/before.json     # at the old commit
    python benchmarks/behaviour_fingerprint.py --out /tmp/after.json --compare /tmp/before.json

Only the command line and `get_method` are used, so the script runs unchanged on both sides.
About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

STEPS = "4"
TRAIN = {
    "ti": ["--method", "textual_inversion", "--subject", "world:duo_ball"],
    "lora": ["--method", "dreambooth_lora", "--subject", "world:duo_ball", "--set", "num_class_images=4"],
    "lora2": [
        "--method",
        "dreambooth_lora",
        "--subject",
        "world:cross_cup",
        "--token",
        "zwx",
        "--set",
        "num_class_images=4",
    ],
    "full": ["--method", "dreambooth", "--subject", "world:duo_ball", "--set", "num_class_images=4"],
    "cd": [
        "--method",
        "custom_diffusion",
        "--subject",
        "world:duo_ball",
        "--set",
        "reg_pool_size=200",
        "--set",
        "num_reg_images=8",
    ],
    "cd2": [
        "--method",
        "custom_diffusion",
        "--subject",
        "world:cross_cup",
        "--token",
        "<new2>",
        "--set",
        "reg_pool_size=200",
        "--set",
        "num_reg_images=8",
    ],
}
GENERATE = {
    "ti": ("a <s*> on the beach", ["ti"], []),
    "ti_no_layout": ("a <s*> on the beach", ["ti"], ["--layout-steps", "0"]),
    "lora": ("a sks ball in the snow", ["lora"], []),
    "full": ("a sks ball in the snow", ["full"], []),
    "cd": ("a <new1> ball at night", ["cd"], []),
    "lora_pair": ("a sks ball and a zwx cup on the grass", ["lora", "lora2"], []),
    "cd_merge": ("a <new1> ball and a <new2> cup on the grass", ["cd", "cd2"], []),
    "lora_regions": ("a sks ball on the beach BREAK a zwx cup on the beach", ["lora", "lora2"], ["--regions"]),
    "cd_regions": ("a <new1> ball on the beach BREAK a <new2> cup on the beach", ["cd", "cd2"], ["--regions"]),
    "ti_and_lora": ("a <s*> and a sks ball", ["ti", "lora"], []),
}


def cli(args: list[str]) -> None:
    from limner.cli import app

    try:
        app(args, standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise


def digest_file(path: Path) -> str:
    if path.suffix == ".png":
        with Image.open(path) as im:
            data = np.asarray(im.convert("RGB")).tobytes()
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
        data = b"".join(k.encode() + state[k].float().numpy().tobytes() for k in sorted(state))
    else:
        data = path.read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def weights(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): digest_file(p)
        for p in sorted(folder.rglob("*.safetensors"))
        if "checkpoints" not in p.parts
    }


def cache_keys() -> dict[str, str]:
    from limner.methods import get_method

    try:
        from limner.evaluation.cache_keys import concept_key
    except ImportError:
        from limner.evaluation.protocol import concept_key
    configs = {
        "default": {},
        "steps": {"max_steps": 600},
        "rank": {"lora_rank": 8, "learning_rate": 1e-3},
        "masked": {"background_weight": 0.1},
        "kv": {"mode": "crossattn_kv"},
    }
    out = {}
    for name in ("textual_inversion", "dreambooth", "dreambooth_lora", "custom_diffusion"):
        m = get_method(name)
        for label, config in configs.items():
            try:
                out[f"{name}/{label}"] = concept_key(m, config, "subject", "base")
            except Exception as e:  # noqa: BLE001 - a setting another method lacks is part of the record too
                out[f"{name}/{label}"] = f"error: {type(e).__name__}"
    return out


def run(work: Path) -> dict:
    record: dict = {"concepts": {}, "images": {}, "eval": {}, "cache_keys": cache_keys()}
    for name, args in TRAIN.items():
        torch.manual_seed(0)  # peft's gaussian LoRA init draws from the global generator
        cli(["train", *args, "--out", str(work / name), "--steps", STEPS, "--batch-size", "2"])
        record["concepts"][name] = weights(work / name)
    for name, (prompt, concepts, extra) in GENERATE.items():
        out = work / f"gen-{name}"
        cli(
            [
                "generate",
                prompt,
                "-n",
                "2",
                "--steps",
                "8",
                "--out",
                str(out),
                *extra,
                *[a for c in concepts for a in ("--concept", str(work / c))],
            ]
        )
        record["images"][name] = [digest_file(p) for p in sorted(out.glob("*.png"))]
    for name in ("ti", "lora", "cd"):
        out = work / f"eval-{name}"
        cli(
            [
                "eval",
                "--concept",
                str(work / name),
                "--subjects",
                "world:duo_ball",
                "--prompts",
                "3",
                "-n",
                "1",
                "--steps",
                "8",
                "--no-bounds",
                "--cache",
                str(work / "eval-cache"),
                "--out",
                str(out),
            ]
        )
        results = json.loads((out / "results.json").read_text())
        (row,) = results["rows"].values()
        record["eval"][name] = {
            "scores": {k: round(v, 6) for k, v in row["mean"].items()},
            "images": [digest_file(Path(p)) for ps in row["images"]["duo_ball"].values() for p in ps],
        }
    return record


def compare(now: dict, before: dict, path: str = "") -> list[str]:
    if isinstance(now, dict) and isinstance(before, dict):
        return [d for k in sorted(set(now) | set(before)) for d in compare(now.get(k), before.get(k), f"{path}/{k}")]
    same = now == before or (
        isinstance(now, float) and isinstance(before, float) and np.isnan(now) and np.isnan(before)
    )
    return [] if same else [f"{path}: {before} -> {now}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LIMNER_CACHE"] = str(Path(tmp) / "cache")
        record = run(Path(tmp))
    a.out.write_text(json.dumps(record, indent=1))
    if a.compare:
        diffs = compare(record, json.loads(a.compare.read_text()))
        print("\n".join(diffs) if diffs else "identical")
        sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
