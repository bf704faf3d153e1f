"""The CUDA path, checked on one GPU: what a user with a GPU meets first.

    python benchmarks/cuda_check.py --out benchmarks/cuda [--subjects duo_ball,night_dog] [--budget 420]

1. Each tuning method trained at its defaults on the world base in full precision and in fp16 and bf16
   mixed precision (accelerate's autocast; fp16 with its loss scaler): wall time, time per step, peak
   GPU memory, whether every logged loss is finite, and the concept's subject and prompt fidelity on
   the world bench (images drawn at --dtype auto: fp32 for the world base). The CPU's fp32 numbers from
   docs/world-bench are printed beside them: the same run on other hardware, so close, not equal.
2. Generation in fp32, fp16 and bf16 from the same seeds, and in fp32 on the CPU: seconds per image, no
   NaN or blank image, how far the images are from the first row's (mean absolute difference, 0-255),
   and one UNet call's relative error: precision's own share of the difference.
3. `limner demo` end to end.

Results go into OUT/world.json and OUT/world.md, written after each row, so a run stopped by
--budget (seconds) keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

METHODS = ["textual_inversion", "dreambooth", "dreambooth_lora", "custom_diffusion"]
PRECISIONS = ["no", "fp16", "bf16"]
CPU_BENCH = Path(__file__).resolve().parents[1] / "docs" / "world-bench" / "results.json"


def loss_summary(log: Path) -> dict:
    """Finite-ness of the logged loss, the mean of its first and last tenth, and the median step time."""
    rows = list(csv.DictReader(log.open()))
    losses = [float(r["loss"]) for r in rows]
    seconds = [float(r["seconds"]) for r in rows]
    tenth = max(1, len(losses) // 10)
    steps = np.diff(seconds) if len(seconds) > 1 else np.array(seconds)
    return {
        "loss_finite": all(math.isfinite(v) for v in losses),
        "loss_first": round(statistics.mean(losses[:tenth]), 4),
        "loss_last": round(statistics.mean(losses[-tenth:]), 4),
        "seconds_per_step": round(float(np.median(steps)), 4),
    }


def training_row(method, precision, subject, device, cache, enc, settings, steps) -> dict:
    """Trains `method` on `subject` at `precision`, then scores the concept on the world bench."""
    from limner.evaluation.bench import peak_memory_mb
    from limner.evaluation.protocol import BaseHandle, Row, personalize_cached, run_eval
    from limner.models.loading import WORLD_BASE, fingerprint

    config = {"mixed_precision": precision} | ({"max_steps": steps} if steps else {})
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()  # loading, regularisation images and validation every sixth of training included
    folder, meta = personalize_cached(
        method, subject, BaseHandle(None, device, fingerprint(WORLD_BASE)), cache, config
    )
    row = {
        "method": method,
        "precision": precision,
        "subject": subject.name,
        "steps": meta.get("steps"),
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }
    row |= loss_summary(folder / "train_log.csv")
    spec = f"{method}:" + ",".join(f"{k}={v}" for k, v in config.items())
    scores = next(iter(run_eval([Row.parse(spec)], [subject], enc, cache, settings, device=device)["rows"].values()))[
        "per_subject"
    ]
    return row | {k: round(scores[subject.name][k], 3) for k in ("subject_fidelity", "prompt_fidelity")}


def generation_rows(record: dict, out: Path, device: str) -> None:
    """The same seeds in each precision, and in fp32 on the CPU: which differences come from precision (one
    UNet call's relative error) and which from sampling (25 steps carry any difference into the image)."""
    from limner.generation import GenerationSettings, generate
    from limner.models.loading import load_base

    runs = (
        [(device, "fp32"), (device, "fp16"), (device, "bf16"), ("cpu", "fp32")]
        if device.startswith("cuda")
        else [("cpu", "fp32"), ("cpu", "bf16")]
    )
    images0 = eps0 = None
    for dev, dtype in runs:
        base = load_base(None, device=dev, dtype=dtype)
        s = GenerationSettings("a red ball on the beach", num_images=8, batch_size=8, seed=0)
        generate(base, GenerationSettings(s.prompt, num_images=1, batch_size=1))  # warm-up
        synchronize(dev)
        t0 = time.perf_counter()
        images = np.stack([np.asarray(im, dtype=np.float32) for im in generate(base, s).images])
        synchronize(dev)
        seconds = time.perf_counter() - t0
        eps = unet_output(base)
        images0 = images if images0 is None else images0
        eps0 = eps if eps0 is None else eps0
        record["generation"].append(
            {
                "device": dev,
                "dtype": dtype,
                "seconds_per_image": round(seconds / s.num_images, 4),
                "finite": bool(np.isfinite(images).all()),
                "min_image_std": round(float(images.reshape(len(images), -1).std(1).min()), 2),
                "mean_abs_diff_vs_first": round(float(np.abs(images - images0).mean()), 2),
                "unet_rel_err_vs_first": round(float(np.linalg.norm(eps - eps0) / np.linalg.norm(eps0)), 5),
            }
        )
        write(out, record)
        del base
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()


def unet_output(base) -> np.ndarray:
    """One UNet call on fixed latents and prompt (t=500)."""
    pipe = base.pipe
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    latents = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer(
        ["a red ball on the beach"] * 2,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids.to(pipe.device))[0]
        eps = pipe.unet(latents.to(pipe.device, pipe.unet.dtype), 500, encoder_hidden_states=cond).sample
    return eps.float().cpu().numpy()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def demo_row(record: dict, out: Path, device: str) -> None:
    """`limner demo` in its own process, as a user runs it; its folder is OUT/demo."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "limner.cli", "demo", "--out", str(out / "demo"), "--device", device],
        capture_output=True,
        text=True,
    )
    tail = proc.stdout + (proc.stderr[-1500:] if proc.returncode else "")
    record["demo"] = {
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "last_lines": tail.strip().splitlines()[-6:],
    }
    write(out, record)


def cpu_reference(method: str, subject: str) -> float | None:
    try:
        return round(json.loads(CPU_BENCH.read_text())["rows"][method]["per_subject"][subject]["subject_fidelity"], 3)
    except (OSError, KeyError):
        return None


def markdown(record: dict) -> str:
    lines = [
        f"# The CUDA path on {record['gpu']} (torch {record['torch']})",
        "",
        "| method | precision | subject | steps | s | s / step | peak MB | loss first -> last | finite | subject fid. | "
        "CPU fp32 subject fid. | prompt fid. |",
        "|---" * 12 + "|",
    ]
    for r in record["training"]:
        lines.append(
            f"| {r['method']} | {r['precision']} | {r['subject']} | {r['steps']} | {r['seconds']} | {r['seconds_per_step']} | "
            f"{r['peak_memory_mb']:.0f} | {r['loss_first']} -> {r['loss_last']} | {r['loss_finite']} | "
            f"{r.get('subject_fidelity', '—')} | {cpu_reference(r['method'], r['subject'])} | {r.get('prompt_fidelity', '—')} |"
        )
    lines += [
        "",
        "| generation | s / image | finite | min image std | mean abs diff vs the first row (0-255) | one UNet call: relative error |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {g['device']} {g['dtype']} | {g['seconds_per_image']} | {g['finite']} | {g['min_image_std']} | {g['mean_abs_diff_vs_first']} | "
        f"{g['unet_rel_err_vs_first']} |"
        for g in record["generation"]
    ]
    if "demo" in record:
        d = record["demo"]
        lines += [
            "",
            f"`limner demo --device cuda`: exit {d['returncode']} in {d['seconds']} s",
            "",
            "```",
            *d["last_lines"],
            "```",
        ]
    return "\n".join(lines) + "\n"


def write(out: Path, record: dict, stem: str = "world", render: Callable[[dict], str] = markdown) -> None:
    """OUT/STEM.json and OUT/STEM.md (the record rendered), rewritten after every row."""
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out / f"{stem}.md").write_text(render(record))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/cuda"))
    ap.add_argument("--subjects", default="duo_ball,night_dog")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--cache", type=Path, help="Eval cache (default: a fresh one, so that every row is trained and timed)."
    )
    ap.add_argument("--budget", type=float, default=1e9, help="Seconds: no training row starts after this.")
    ap.add_argument(
        "--device", default="cuda", help="cpu runs the same checks, for trying the script itself (with --steps)."
    )
    ap.add_argument("--steps", type=int, help="Training steps for every method (default: each method's).")
    ap.add_argument("--prompts", type=int, help="Bench prompts per subject (default: all).")
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--generation-only", action="store_true", help="Only the generation rows (seconds).")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("cuda_check: torch sees no CUDA device")
    from limner.evaluation.protocol import EvalSettings, build_encoders
    from limner.evaluation.subjects import world_subjects

    a.cache = a.cache or Path(tempfile.mkdtemp(prefix="limner-cuda-check-"))
    deadline = time.monotonic() + a.budget
    a.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    record = {"gpu": gpu, "torch": torch.__version__, "training": [], "generation": []}
    generation_rows(record, a.out, a.device)
    if a.generation_only:
        return print(markdown(record))
    if not a.no_demo:
        demo_row(record, a.out, a.device)
    subjects = world_subjects("world:" + a.subjects)
    enc = build_encoders(True, None, None, None, None, a.device)
    settings = EvalSettings(max_prompts=a.prompts)
    for subject in subjects:  # every method and precision on the first subject before any on the second
        for method in a.methods.split(","):
            for precision in PRECISIONS:
                if time.monotonic() > deadline:
                    break
                record["training"].append(
                    training_row(method, precision, subject, a.device, a.cache, enc, settings, a.steps)
                )
                write(a.out, record)
    print(markdown(record))


if __name__ == "__main__":
    main()
