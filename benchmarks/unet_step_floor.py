"""The least a training step on the world UNet can cost, beside a LoRA step and a full fine-tuning step.

    python benchmarks/unet_step_floor.py [--steps 40] [--rounds 3]

Issue 26 asks limner's DreamBooth-LoRA to take at most 0.75x the time per step of diffusers' example script at
identical settings (batch 4, 64 px). Both run the same UNet forward and backward; this measures how much of a step
that is. Three loops on the world UNet (batch 4, 16x16 latents, 77 text tokens), each timed per step after 5
warm-up steps, alternating so that a busy moment of the machine does not fall on one of them:

- `frozen`: forward + backward to the input with every weight frozen: what any LoRA step costs at the least;
- `lora`: peft's rank-8 LoRA on to_q/to_k/to_v/to_out.0 (limner.adapters.lora.add_lora), fused AdamW;
- `full`: every UNet weight trained, fused AdamW (DreamBooth).

Prints the median seconds per step of each, per round and over all rounds. Compare them with the diffusers
scripts' s/step in benchmarks/results/results.md (measured in that benchmark's venv: run this one there too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MODES = ("frozen", "lora", "full")


def step_times(mode: str, steps: int) -> list[float]:
    from limner.adapters.lora import add_lora
    from limner.models.loading import load_base

    torch.manual_seed(0)
    unet = load_base(None, dtype="fp32").pipe.unet
    unet.train()
    x = torch.randn(4, unet.config.in_channels, 16, 16)
    text = torch.randn(4, 77, unet.config.cross_attention_dim)
    t = torch.randint(0, 1000, (4,))
    if mode == "full":
        params = list(unet.parameters())
    else:
        unet.requires_grad_(False)
        params = add_lora(unet, 8, 8, ["to_q", "to_k", "to_v", "to_out.0"]) if mode == "lora" else []
    if mode == "frozen":
        x.requires_grad_(True)  # the backward runs through the whole UNet to its input
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None

    def step() -> None:
        loss = torch.nn.functional.mse_loss(unet(x, t, text).sample, x.detach())
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(5):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    every: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            times = step_times(mode, args.steps)
            every[mode] += times
            print(f"round {r + 1} {mode:6s} median {statistics.median(times):.4f} s/step", flush=True)
    for mode in MODES:
        print(f"{mode:6s} median over rounds {statistics.median(every[mode]):.4f} s/step")


if __name__ == "__main__":
    main()
