"""Mixed precision and gradient checkpointing at Stable Diffusion 1.5's size, on one GPU.

    python benchmarks/cuda_sd_shaped.py --out benchmarks/cuda [--steps 20] [--budget 240]

No SD checkpoint can be downloaded here, so this builds a random-weight pipeline with SD 1.5's shapes
(UNet 320-640-1280-1280 with 768-wide cross-attention, a 12-layer 768-wide CLIP text encoder, the
4-level VAE; 512 px images) in diffusers layout, and trains each tuning method on a world subject's
references with it through limner's own loader, as a user's local SD folder is trained: seconds per
step and peak GPU memory per method and precision. What a random model learns is meaningless; the
cost of learning it is not. (On the world base the model is so small that the GPU's time goes to
launching kernels, and mixed precision saves nothing: see results.md beside this file.)

Results go into OUT/sd_shaped.json and OUT/sd_shaped.md, written after each row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_check import loss_summary, synchronize, write  # noqa: E402

# (method, mixed precision, gradient checkpointing), most telling first
ROWS = [
    ("dreambooth_lora", "no", False),
    ("dreambooth_lora", "fp16", False),
    ("dreambooth_lora", "bf16", False),
    ("dreambooth", "no", False),
    ("dreambooth", "bf16", False),
    ("dreambooth", "bf16", True),
    ("textual_inversion", "fp16", False),
    ("custom_diffusion", "fp16", False),
    ("dreambooth", "fp16", False),
]
QUICK_SETTINGS = {  # the regularisers' image generation is timed by the world runs; here only training
    "dreambooth": {"prior_preservation": "none"},
    "dreambooth_lora": {"prior_preservation": "none"},
    "custom_diffusion": {"prior_preservation": False},
    "textual_inversion": {},
}


def build_sd15_shaped(folder: Path, width: int = 320, text_width: int = 768) -> Path:
    """A random-weight pipeline with SD 1.5's layout and sizes (width 320 and text width 768 are SD 1.5's;
    smaller ones try the script on a CPU). The tokenizer is the world's: only the vocabulary differs."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from limner.world.stack import build_tokenizer

    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(0)
    tok = build_tokenizer()
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=text_width,
            intermediate_size=4 * text_width,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=tok.model_max_length,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=text_width,
        attention_head_dim=8,
        layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    sched = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def train_row(
    method_name: str, precision: str, checkpointing: bool, base_dir: Path, subject, steps: int, work: Path, device: str
) -> dict:
    from limner.evaluation.bench import peak_memory_mb
    from limner.methods import get_method
    from limner.models.loading import load_base

    method = get_method(method_name)
    base = load_base(str(base_dir), device=device, dtype="fp32")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # the method's own defaults (batch, learning rate), with the steps and the two settings measured here
    train = replace(
        method.default_train_config(),
        max_steps=steps,
        mixed_precision=precision,
        gradient_checkpointing=checkpointing,
        checkpoint_every=0,
        validate_every=0,
    )
    t0 = time.perf_counter()
    folder = work / f"{method_name}-{precision}-{int(checkpointing)}"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run, not a resumed one
    out = method.personalize(base, subject, folder, train=train, **QUICK_SETTINGS[method_name])
    seconds = time.perf_counter() - t0
    row = {
        "method": method_name,
        "precision": precision,
        "gradient_checkpointing": checkpointing,
        "steps": steps,
        "batch_size": train.batch_size,
        "seconds": round(seconds, 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }
    return row | loss_summary(out / "train_log.csv")


def row_in_own_process(method: str, precision: str, checkpointing: bool, a: argparse.Namespace) -> dict:
    """One training row in a fresh process, so that its peak memory (and the kernels the GPU's libraries
    picked) owe nothing to the rows before it. A row that fails is a finding: recorded, the others still run."""
    result = a.work / "row.json"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "--row",
        f"{method}:{precision}:{int(checkpointing)}",
        "--work",
        str(a.work),
        "--steps",
        str(a.steps),
        "--device",
        a.device,
        "--out",
        str(result),
        "--width",
        str(a.width),
        "--text-width",
        str(a.text_width),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0 and result.exists():
        return json.loads(result.read_text())
    return {
        "method": method,
        "precision": precision,
        "gradient_checkpointing": checkpointing,
        "error": proc.stderr.strip()[-500:],
    }


def generation_rows(base_dir: Path, device: str) -> list[dict]:
    from limner.evaluation.bench import peak_memory_mb
    from limner.generation import GenerationSettings, generate
    from limner.models.loading import load_base

    rows = []
    for dtype in ("fp32", "fp16", "bf16") if device.startswith("cuda") else ("fp32",):
        base = load_base(str(base_dir), device=device, dtype=dtype)
        s = GenerationSettings("a red ball on the beach", num_images=4, batch_size=4, steps=25)
        generate(base, GenerationSettings(s.prompt, num_images=1, batch_size=1, steps=2))  # warm-up
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        synchronize(device)
        t0 = time.perf_counter()
        images = np.stack([np.asarray(im, dtype=np.float32) for im in generate(base, s).images])
        synchronize(device)
        rows.append(
            {
                "dtype": dtype,
                "seconds_per_image": round((time.perf_counter() - t0) / s.num_images, 3),
                "finite": bool(np.isfinite(images).all()),
                "peak_memory_mb": round(peak_memory_mb(device), 1),
                "size": f"{images.shape[2]}x{images.shape[1]}",
            }
        )
        del base
    return rows


def markdown(record: dict) -> str:
    lines = [
        f"# SD 1.5-shaped random pipeline on {record['gpu']} (torch {record['torch']}): {record['unet_params_m']} M UNet parameters",
        "",
        f"Training at {record['resolution']} px, {record['steps']} steps per row.",
        "",
        "| method | mixed precision | gradient checkpointing | batch | s / step | peak MB | loss finite |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["training"]:
        cells = (
            f"{r['batch_size']} | {r['seconds_per_step']} | {r['peak_memory_mb']:.0f} | {r['loss_finite']}"
            if "error" not in r
            else f"| failed: {r['error']} | |"
        )
        lines.append(f"| {r['method']} | {r['precision']} | {r['gradient_checkpointing']} | {cells} |")
    lines += ["", "| generation dtype | size | s / image (25 steps) | peak MB | finite |", "|---|---|---|---|---|"]
    lines += [
        f"| {g['dtype']} | {g['size']} | {g['seconds_per_image']} | {g['peak_memory_mb']:.0f} | {g['finite']} |"
        for g in record["generation"]
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/cuda"))
    ap.add_argument("--work", type=Path, default=Path(".limner-cache/sd-shaped"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget", type=float, default=1e9, help="Seconds: no training row starts after this.")
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--width", type=int, default=320, help="UNet base width (SD 1.5: 320; smaller to try the script on a CPU)."
    )
    ap.add_argument("--text-width", type=int, default=768)
    ap.add_argument("--methods", help="Only these methods' rows (comma-separated).")
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # METHOD:PRECISION:CHECKPOINTING, run by row_in_own_process
    a = ap.parse_args()
    from limner.evaluation.subjects import world_subjects

    if a.row:
        method, precision, checkpointing = a.row.split(":")
        row = train_row(
            method,
            precision,
            checkpointing == "1",
            a.work / f"base-{a.width}-{a.text_width}",
            world_subjects("world:duo_ball")[0],
            a.steps,
            a.work,
            a.device,
        )
        return a.out.write_text(json.dumps(row))

    deadline = time.monotonic() + a.budget
    a.out.mkdir(parents=True, exist_ok=True)
    base_dir = build_sd15_shaped(a.work / f"base-{a.width}-{a.text_width}", a.width, a.text_width)
    from safetensors import safe_open

    with safe_open(str(base_dir / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        params = sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys())
    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    record = {
        "gpu": gpu,
        "torch": torch.__version__,
        "unet_params_m": round(params / 1e6),
        "resolution": 512,
        "steps": a.steps,
        "training": [],
        "generation": [],
    }
    record["generation"] = [] if a.no_generation else generation_rows(base_dir, a.device)
    write(a.out, record, "sd_shaped", markdown)
    for method, precision, checkpointing in ROWS:
        if time.monotonic() > deadline:
            break
        if a.methods and method not in a.methods.split(","):
            continue
        record["training"].append(row_in_own_process(method, precision, checkpointing, a))
        write(a.out, record, "sd_shaped", markdown)
    print(markdown(record))


if __name__ == "__main__":
    main()
