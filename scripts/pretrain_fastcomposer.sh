#!/usr/bin/env bash
# Pretrains the world's FastComposer adapter into DIR (default .limner-pretrain/fastcomposer) in six stages, as the
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
#   stage 4, DIR-stage4: 7000 more steps from stage 3's weights, seed 3, the same cosine (52 minutes on both cores;
#     shipped 2026-12-07, session 13: subject fidelity 0.309, language drift halved, two subjects recognised in 5 of 48).
#   Stages 1-4 drew each subject's crop from another view of it (pair=view, then the default); from stage 5 on, from
#   the target image itself, as the paper (pair=self, now the default), which lifted stage 4's plateau:
#   stage 5, DIR-stage5: 5000 more steps from stage 4's weights, seed 4, the same cosine (31 minutes on both cores;
#     session 14: subject fidelity 0.374).
#   stage 6, DIR: 5000 more from stage 5's, seed 5, the same cosine (30 minutes; shipped 2026-12-07, session 14:
#     subject fidelity 0.409). A seventh stage (5000 more, seed 6) read 0.391: this recipe's plateau, not shipped.
# Resumable: after an interruption, run it again and each stage continues from its last checkpoint (every 250
# steps), its data stream where it was; a finished stage is not run again.
set -euo pipefail
out=${1:-.limner-pretrain/fastcomposer}
common=(--method fastcomposer --data world --batch-size 8 --lr 1e-4 --set checkpoint_every=250
        --set lr_warmup_steps=100 --resume latest)
view=(--set pair=view)
if [ ! -f "$out-stage1/adapter.json" ]; then
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE limner pretrain "${common[@]}" "${view[@]}" --out "$out-stage1" \
        --steps 2400 --seed 0
fi
# stage N (2 to 5) continues stage N-1 on a cosine: continue_stage N STEPS SEED [SETTINGS...]
continue_stage() {
    local n=$1 steps=$2 seed=$3
    shift 3
    if [ ! -f "$out-stage$n/adapter.json" ]; then
        limner pretrain "${common[@]}" "$@" --out "$out-stage$n" --steps "$steps" --seed "$seed" \
            --set lr_schedule=cosine --set init="$out-stage$((n - 1))"
    fi
}
continue_stage 2 5000 1 "${view[@]}"
continue_stage 3 5000 2 "${view[@]}"
continue_stage 4 7000 3 "${view[@]}"
continue_stage 5 5000 4
limner pretrain "${common[@]}" --out "$out" --steps 5000 --seed 5 --set lr_schedule=cosine --set init="$out-stage5"
