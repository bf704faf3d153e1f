#!/usr/bin/env bash
# Pretrains the world's PhotoMaker adapter into DIR (default .limner-pretrain/photomaker): 1200 steps of batch 8 on
# the world's identity stream (several views of each person: other context, pose, scale and clothes; 1 to 4 views
# stacked per sample), one thread, on a 2-core machine beside other jobs (about 2 s a step there, 43 minutes).
# The paper's recipe is the method's defaults: masked diffusion loss with p 0.5, 10% null text, the UNet's rank-32
# LoRA on every attention projection, the image encoder's last 2 layers, the projection and the fuse module from
# scratch; AdamW 1e-4 after 100 warm-up steps. Resumable: after an interruption, run it again and it continues from
# its last checkpoint (every 200 steps), its data stream where it was. The shipped adapter
# (src/limner/assets/world/adapters/photomaker/) is this folder's photomaker.safetensors and adapter.json.
set -euo pipefail
out=${1:-.limner-pretrain/photomaker}
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
limner pretrain --method photomaker --data world --out "$out" --steps "${STEPS:-1200}" --batch-size 8 --lr 1e-4 \
    --seed 0 --set checkpoint_every=200 --set lr_warmup_steps=100 --resume latest
