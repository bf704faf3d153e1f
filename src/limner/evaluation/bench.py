"""`limner bench`: time and memory per row, measured side by side in one run.

Each row runs in its own subprocess, so its peak memory is its own (peak RSS on CPU, peak allocated
memory on CUDA) and nothing one row loaded speeds up or slows down the next.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from limner.errors import LimnerError


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(
    row: str,
    subject_spec: str,
    class_noun: str | None,
    base: str | None,
    device: str,
    images: int,
    steps: int,
    cache: Path,
) -> dict:
    """Runs in the worker: personalize (methods), then time `images` generations."""
    from limner.conditioning import apply_concepts, concept_prompt
    from limner.evaluation.protocol import (
        FIDELITY_THRESHOLD,
        LOWER,
        BaseHandle,
        Row,
        personalize_cached,
        time_to_fidelity,
    )
    from limner.evaluation.subjects import load_subjects
    from limner.generation import GenerationSettings, generate
    from limner.models.loading import WORLD_BASE, fingerprint, load_base

    subject = load_subjects(subject_spec, class_noun)[0]
    record = {"row": row, "subject": subject.name}
    prompt = f"a {subject.class_noun} on the beach"
    concept = None
    if row != LOWER:
        spec = Row.parse(row)  # METHOD or METHOD:key=value,... (e.g. dreambooth_lora:mixed_precision=fp16)
        handle = BaseHandle(base, device, fingerprint(WORLD_BASE if base is None else Path(base)))
        t1 = time.perf_counter()
        concept, meta = personalize_cached(spec.method, subject, handle, cache, dict(spec.config))
        record["cached_concept"] = time.perf_counter() - t1 < meta.get("personalize_seconds", 0)
        record["personalize_seconds"] = meta.get("personalize_seconds")
        record["steps"] = meta.get("steps")
        record["time_to_fidelity"] = time_to_fidelity({subject.name: meta}, FIDELITY_THRESHOLD)["mean_seconds"]
        if not record["cached_concept"]:  # training's peak is this row's peak
            record["train_peak_memory_mb"] = round(peak_memory_mb(device), 1)
    t0 = time.perf_counter()
    b = load_base(base, device=device)
    record["load_seconds"] = round(time.perf_counter() - t0, 3)
    conditioning = None
    if concept is not None:
        prompt = concept_prompt(concept, "a {} on the beach")
        conditioning = apply_concepts(b, [concept]).condition(prompt, steps)
    s = GenerationSettings(prompt, num_images=1, steps=steps, batch_size=1)
    generate(b, s, conditioning=conditioning)  # warm-up
    t2 = time.perf_counter()
    for i in range(images):
        s.seed = i
        generate(b, s, conditioning=conditioning)
    record["seconds_per_image"] = round((time.perf_counter() - t2) / images, 4)
    record["generation_steps"] = steps
    record["peak_memory_mb"] = round(peak_memory_mb(str(b.device)), 1)
    record["device"] = str(b.device)
    return record


def run_bench(
    rows: list[str],
    subject_spec: str,
    base: str | None,
    device: str,
    images: int,
    steps: int,
    cache: Path,
    class_noun: str | None = None,
) -> list[dict]:
    import tempfile

    records = []
    for row in rows:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [
                sys.executable,
                "-m",
                "limner.evaluation.bench",
                "--row",
                row,
                "--subject",
                subject_spec,
                "--device",
                device,
                "--images",
                str(images),
                "--steps",
                str(steps),
                "--cache",
                str(cache),
                "--result",
                str(result),
            ]
            cmd += (["--base", base] if base else []) + (["--class-noun", class_noun] if class_noun else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not result.exists():
                raise LimnerError(f"bench of {row} failed:\n{proc.stderr[-2000:]}")
            records.append(json.loads(result.read_text()))
    return records


def markdown(records: list[dict]) -> str:
    lines = [
        "| row | personalize s | steps | train s to fidelity 0.5 | s / image | peak memory MB (process) | device |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ttf = r.get("time_to_fidelity")
        lines.append(
            f"| {r['row']} | {r.get('personalize_seconds', '—')} | {r.get('steps') or '—'} | "
            f"{'—' if ttf is None else f'{ttf:.0f}'} | "
            f"{r['seconds_per_image']:.3f} | {r['peak_memory_mb']:.0f} | {r['device']} |"
        )
    return "\n".join(lines) + "\n"


def _worker() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--row", required=True)
    ap.add_argument("--subject", required=True)
    ap.add_argument("--base")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--class-noun")
    ap.add_argument("--result", type=Path, required=True)
    a = ap.parse_args()
    a.result.write_text(
        json.dumps(measure(a.row, a.subject, a.class_noun, a.base, a.device, a.images, a.steps, a.cache))
    )


if __name__ == "__main__":
    _worker()
