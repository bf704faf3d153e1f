"""BLIP-Diffusion's stage-2 training step: limner's (its Stage2 task through the shared trainer) against the
equivalent step written as the official code writes it (LAVIS `BlipDiffusion.forward`: VAE latents, noise, the
Q-Former's subject embeddings, diffusers' `ContextCLIPTextModel`, the UNet, MSE, backward, AdamW), on the same
base, batch and trainable parameters (Q-Former, ProjLayer, the UNet's LoRA).

LAVIS cannot be installed here, and diffusers' own `Blip2QFormerModel` does not run on transformers 5 (README), so
the script's Q-Former is limner's (the same weights diffusers' class loads); diffusers' ContextCLIPTextModel runs,
without its causal mask on transformers 5 (the same cost). Rounds alternate between the two, one thread each, so
load from other processes hits both alike.

    python benchmarks/blip_diffusion_step.py --steps 10 --rounds 3 --batch-size 8 --out benchmarks/blip_diffusion
    python benchmarks/blip_diffusion_step.py --memory --steps 10 --batch-size 8 --out benchmarks/blip_diffusion

--memory runs each side alone in a child process of its own (the same setup, then its steps) and reads the child's
peak resident memory (ru_maxrss): what training adds to the loaded models, activations and optimizer state.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--memory", action="store_true", help="peak memory of each side, each in a process of its own")
    parser.add_argument("--side", choices=("limner", "official"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        return peak_memory(args)
    torch.set_num_threads(1)

    from diffusers.pipelines.deprecated.blip_diffusion import ContextCLIPTextModel

    from limner.adapters.lora import add_lora
    from limner.data import open_stream
    from limner.methods.blip_diffusion import formats
    from limner.methods.blip_diffusion.context_text import tokenize_with_context
    from limner.methods.blip_diffusion.method import (
        UNET_TARGETS,
        BlipDiffusionSettings,
        ImagePrep,
        Stage2,
        stage2_batches,
    )
    from limner.methods.blip_diffusion.qformer import build_bert_tokenizer, world_words
    from limner.models.loading import load_base
    from limner.training import TrainConfig, noise_scheduler, train

    base = load_base(None)
    pipe = base.pipe
    torch.manual_seed(0)
    encoder = formats.new_subject_encoder(base.path / "image_encoder", build_bert_tokenizer(world_words()))
    prep = ImagePrep.for_encoder(encoder, base.path / "feature_extractor")
    stream = open_stream(
        "world", seed=0, rank=0, world_size=1, resolution=base.resolution, pair="self", captions="class"
    )
    batch = stage2_batches(stream, prep, base.resolution, args.batch_size)(torch.Generator().manual_seed(0))
    add_lora(pipe.unet, 16, 16, UNET_TARGETS)
    cfg = BlipDiffusionSettings(drop_subject=0.0)

    # the official step, as LAVIS's forward reads, with diffusers' context-aware text encoder
    context_clip = ContextCLIPTextModel(pipe.text_encoder.config)
    context_clip.load_state_dict(formats.context_text_state(pipe.text_encoder))
    context_clip.requires_grad_(False)
    params = [p for n, p in encoder.named_parameters() if not n.startswith("visual_encoder")]
    params += [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    scheduler = noise_scheduler(pipe)

    def official_step() -> None:
        with torch.no_grad():
            latents = pipe.vae.encode(batch["images"]).latent_dist.sample() * pipe.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
        noisy = scheduler.add_noise(latents, noise, t)
        ctx = encoder(batch["pixels"], batch["subjects"])
        ids = tokenize_with_context(pipe.tokenizer, batch["texts"], encoder.num_query_tokens)
        hidden = context_clip(input_ids=ids, ctx_embeddings=ctx, ctx_begin_pos=[2] * len(ids))[0]
        loss = F.mse_loss(pipe.unet(noisy, t, hidden).sample.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def official(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            official_step()
            times.append(time.perf_counter() - t0)
        return times

    def limner_run(n: int, folder: Path) -> list[float]:
        task = Stage2(base, encoder, cfg)
        log = train(
            task, lambda g: batch, TrainConfig(max_steps=n, batch_size=args.batch_size, checkpoint_every=0), folder
        )
        seconds = [row["seconds"] for row in log.curve]
        return [b - a for a, b in zip([0.0, *seconds[:-1]], seconds)]

    if args.side:  # one side alone, for --memory: its steps, then this process's peak resident memory
        folder = Path("/tmp/limner-blip-step")
        if args.side == "limner":  # the trainer writes its checkpoint at the last step
            times = limner_run(args.steps, folder / "alone")
        else:  # and LAVIS's runner its own (the trained weights and the optimizer's state) after training
            times = official(args.steps)
            trained = {
                n: p for n, p in [*encoder.named_parameters(), *pipe.unet.named_parameters()] if p.requires_grad
            }
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"model": trained, "optimizer": optimizer.state_dict()}, folder / "official.pth")
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"side": args.side, "median_s": statistics.median(times[1:]), "peak_rss_mib": peak_mib}))
        return None
    official(2)  # warm-up, both
    results = {"limner": [], "official": []}
    tmp = Path("/tmp/limner-blip-step")
    for r in range(args.rounds):
        results["limner"] += limner_run(args.steps, tmp / f"r{r}")[1:]  # the first step pays for setup
        results["official"] += official(args.steps)[1:]
    summary = {k: {"median_s": round(statistics.median(v), 4), "steps": len(v)} for k, v in results.items()}
    summary["ratio"] = round(summary["limner"]["median_s"] / summary["official"]["median_s"], 3)
    report(summary, args, "step.json")


def peak_memory(args: argparse.Namespace) -> None:
    """Each side in a child process of its own, the same setup and steps; their peak resident memory."""
    summary = {}
    for side in ("limner", "official"):
        command = [
            sys.executable,
            __file__,
            "--side",
            side,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        summary[side] = json.loads(out.strip().splitlines()[-1])
    summary["memory_ratio"] = round(summary["limner"]["peak_rss_mib"] / summary["official"]["peak_rss_mib"], 3)
    report(summary, args, "memory.json")


def report(summary: dict, args: argparse.Namespace, name: str) -> None:
    summary["batch_size"] = args.batch_size
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / name).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
