#!/usr/bin/env bash
# Pretrains the world's FastComposer adapter into DIR (default .limner-pretrain/fastcomposer): 2400 steps of batch 8
# on world scenes of 1 to 4 subjects, one thread, as the shipped one was on a 2-core machine beside other jobs
# (about 1.65 s a step there, 66 minutes). The paper's losses and drops are the method's defaults (localization
# weight 1e-3 on the middle 5 cross-attention blocks, masked denoising with p 0.5, unconditioning 0.1); the UNet
# learns a rank-32 LoRA, the image encoder its last 2 layers, the fuse MLP from scratch; AdamW 1e-4 after 100
# warm-up steps. Resumable: after an interruption, run it again and it continues from its last checkpoint (every
# 250 steps), its data stream where it was. The shipped adapter (src/limner/assets/world/adapters/fastcomposer/) is
# this folder's fastcomposer.safetensors and adapter.json.
set -euo pipefail
out=${1:-.limner-pretrain/fastcomposer}
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
limner pretrain --method fastcomposer --data world --out "$out" --steps "${STEPS:-2400}" --batch-size 8 --lr 1e-4 \
    --seed 0 --set checkpoint_every=250 --set lr_warmup_steps=100 --resume latest
