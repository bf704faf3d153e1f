#!/usr/bin/env bash
# Pretrains the world's StoryMaker adapter into DIR (default .limner-pretrain/storymaker): STEPS (default 1400) of
# batch 8, one thread, as the shipped one was on the 2-core machine beside three other jobs. Data: the world's
# characters, each target beside a whole second view of the same person in the same shirt, and a quarter of the
# batches two characters side by side (limner.methods.storymaker.data). The paper's losses and drops are the
# method's defaults (denoising weighted x6 on the characters, 0.1 x the cross-attention map loss, drops text 0.2,
# image 0.05, both 0.05, face and body tokens 0.1 each); world-sized widths keep the adapter under 7 MB (LoRA rank 8,
# face perceiver depth 1, Resampler width 128). AdamW 1e-4 after 100 warm-up steps. Resumable: run it again and it
# continues from its last checkpoint (every 100 steps), its data stream where it was. The shipped adapter
# (src/limner/assets/world/adapters/storymaker/) is this folder's storymaker.safetensors and adapter.json.
set -euo pipefail
out=${1:-.limner-pretrain/storymaker}
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
limner pretrain --method storymaker --data world --out "$out" --steps "${STEPS:-1400}" --batch-size 8 --lr 1e-4 \
    --seed 0 --set checkpoint_every=100 --set lr_warmup_steps=100 --resume latest
