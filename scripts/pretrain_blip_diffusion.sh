#!/usr/bin/env bash
# Pretrains the world's BLIP-Diffusion adapter into OUT (default /work/pretrain/blip_diffusion/adapter) in four
# runs, as the shipped one (src/limner/assets/world/adapters/blip_diffusion/) was made on the 2-core machine:
#   OUT-first: stage 1 (ITC + ITG on the world stream's full captions) 1000 steps, then stage 2 (prompted context
#     generation with class captions) 1800 steps, batch 8, AdamW 1e-4 constant after 50 warm-up steps, seed 0, one
#     thread (62 minutes beside other jobs). The first shipped adapter (zero-shot subject fidelity 0.185).
#   OUT-second: 4000 more stage-2 steps from its weights (--set init=; stage 1 is not run again) on fresh samples
#     (seed 2), the rate cooled from 1e-4 to 0 on a cosine, both threads (20 minutes alone; zero-shot 0.323).
#   OUT-third: 4000 more from those, seed 3, the same cosine from 1e-4 again (20 minutes alone; zero-shot 0.366).
#   OUT: 4000 more from those, seed 4, the same cosine (20 minutes; zero-shot 0.405, fine-tuned 0.650).
# Resumable: run it again after an interruption and each run continues from its last checkpoint, its data stream
# where it was (--resume latest picks up whichever stage was running); a finished run is not run again.
#   scripts/pretrain_blip_diffusion.sh [OUT] [LOG]
set -euo pipefail
OUT=${1:-/work/pretrain/blip_diffusion/adapter}
LOG=${2:-/work/pretrain/blip_diffusion/log.txt}
export HF_HUB_OFFLINE=1
mkdir -p "$(dirname "$LOG")"
common=(--method blip_diffusion --data world --batch-size 8 --set lr_warmup_steps=50 --resume latest)
if [ ! -f "$OUT-first/adapter.json" ]; then
  OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE MKL_NUM_THREADS=1 limner pretrain "${common[@]}" --out "$OUT-first" \
    --steps 1800 --set stage1_steps=1000 --set checkpoint_every=100 >>"$LOG" 2>&1
fi
continued=(--steps 4000 --lr 1e-4 --set lr_schedule=cosine --set checkpoint_every=250)
if [ ! -f "$OUT-second/adapter.json" ]; then
  limner pretrain "${common[@]}" "${continued[@]}" --out "$OUT-second" --seed 2 --set init="$OUT-first" >>"$LOG" 2>&1
fi
if [ ! -f "$OUT-third/adapter.json" ]; then
  limner pretrain "${common[@]}" "${continued[@]}" --out "$OUT-third" --seed 3 --set init="$OUT-second" >>"$LOG" 2>&1
fi
limner pretrain "${common[@]}" "${continued[@]}" --out "$OUT" --seed 4 --set init="$OUT-third" >>"$LOG" 2>&1
