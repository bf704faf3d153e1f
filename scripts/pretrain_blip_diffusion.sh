#!/usr/bin/env bash
# Pretrains the world's BLIP-Diffusion adapter (stage 1: ITC + ITG on the world stream's full captions; stage 2:
# prompted context generation with class captions), one CPU thread, about an hour on this 2-core machine beside
# other jobs. Rerun the same command to resume (--resume latest picks up whichever stage was running).
#   scripts/pretrain_blip_diffusion.sh [OUT] [LOG]
set -euo pipefail
OUT=${1:-/work/pretrain/blip_diffusion/adapter}
LOG=${2:-/work/pretrain/blip_diffusion/log.txt}
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$(dirname "$LOG")"
limner pretrain --method blip_diffusion --data world --out "$OUT" \
  --steps 1800 --batch-size 8 \
  --set stage1_steps=1000 --set lr_warmup_steps=50 --set checkpoint_every=100 \
  --resume latest >>"$LOG" 2>&1
