#!/usr/bin/env bash
# Pretrains the world's FastComposer adapter into DIR (default .limner-pretrain/fastcomposer) in four stages, as the
# shipped one (src/limner/assets/world/adapters/fastcomposer/: this folder's fastcomposer.safetensors and
# adapter.json) was made on the 2-core machine:
#   stage 1, DIR-stage1: 2400 steps of batch 8 on world scenes of 1 to 4 subjects, AdamW 1e-4 constant after 100
#     warm-up steps, seed 0, one thread (58 minutes beside other jobs; 15 alone on both cores). The paper's losses
#     and drops are the method's defaults (localization weight 1e-3 on the middle 5 cross-attention blocks, masked
#     denoising with p 0.5, unconditioning 0.1); the UNet learns a rank-32 LoRA, the image encoder its last 2
#     layers, the fuse MLP from scratch. This was the first shipped adapter (subject fidelity 0.172).
#   stage 2, DIR-stage2: 5000 more steps from stage 1's weights (--set init=) on fresh samples (seed 1), the rate
#     cooled from 1e-4 to 0 on a cosine, both threads (38 minutes; shipped 2026-12-07, subject fidelity 0.256).
#   stage 3, DIR-stage3: 5000 more steps from stage 2's weights, seed 2, the same cosine from 1e-4 again (40 minutes
#     on both cores; shipped 2026-12-07, subject fidelity 0.306).
#   stage 4, DIR: 7000 more steps from stage 3's weights, seed 3, the same cosine (52 minutes on both cores; shipped
#     2026-12-07, session 13: subject fidelity 0.309, language drift halved, two subjects recognised in 5 of 48).
# Resumable: after an interruption, run it again and each stage continues from its last checkpoint (every 250
# steps), its data stream where it was; a finished stage is not run again.
set -euo pipefail
out=${1:-.limner-pretrain/fastcomposer}
common=(--method fastcomposer --data world --batch-size 8 --lr 1e-4 --set checkpoint_every=250
        --set lr_warmup_steps=100 --resume latest)
if [ ! -f "$out-stage1/adapter.json" ]; then
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE limner pretrain "${common[@]}" --out "$out-stage1" --steps 2400 --seed 0
fi
if [ ! -f "$out-stage2/adapter.json" ]; then
    limner pretrain "${common[@]}" --out "$out-stage2" --steps 5000 --seed 1 --set lr_schedule=cosine \
        --set init="$out-stage1"
fi
if [ ! -f "$out-stage3/adapter.json" ]; then
    limner pretrain "${common[@]}" --out "$out-stage3" --steps 5000 --seed 2 --set lr_schedule=cosine \
        --set init="$out-stage2"
fi
limner pretrain "${common[@]}" --out "$out" --steps 7000 --seed 3 --set lr_schedule=cosine --set init="$out-stage3"
