#!/usr/bin/env bash
# Pretrains the world's StoryMaker adapter into DIR (default .limner-pretrain/storymaker) in the four stages the
# shipped one was made in, each continuing from the last (--set init=), on a fresh part of the data stream (its own
# seed), all batch 8 at AdamW 1e-4 on the 2-core machine:
#   stage 1: 1400 steps from fresh weights, 100 warm-up steps (the first shipped adapter, 2026-12-06);
#   stage 2: 1500 steps, 50 warm-up steps;  stage 3: 3000 steps, 50 warm-up steps;
#   stage 4: 1500 steps with the learning rate cosine-cooled to 0;
#   stage 5: 450 steps beside the world's pose ControlNet (the paper's pose decoupling: each target's skeleton through
#            a frozen OpenPose ControlNet; `limner world pose` makes it, shipped in the package), 25 warm-up steps,
#            then cosine-cooled to 0.
# 7850 steps in all, about 60 minutes alone on both cores (0.42 s a step, 0.64 beside the pose ControlNet; stage 1
# took 40 minutes on one thread beside three other jobs, about 10 alone). Data: the world's characters, each target beside a whole second view of the same person
# in the same shirt, and a quarter of the batches two characters side by side (limner.methods.storymaker.data). The
# paper's losses and drops are the method's defaults (denoising weighted x6 on the characters, 0.1 x the
# cross-attention map loss, drops text 0.2, image 0.05, both 0.05, face and body tokens 0.1 each); world-sized
# widths keep the adapter under 7 MB (LoRA rank 8, face perceiver depth 1, Resampler width 128). Resumable: run it
# again and the unfinished stage continues from its last checkpoint (every 100 steps), its data stream where it was.
# The shipped adapter (src/limner/assets/world/adapters/storymaker/) is DIR's storymaker.safetensors and adapter.json,
# whose `started_from` names every earlier stage.
set -euo pipefail
out=${1:-.limner-pretrain/storymaker}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
common=(--method storymaker --data world --batch-size 8 --lr 1e-4 --set checkpoint_every=100 --resume latest)

stage() {  # stage DIR STEPS SEED [--set ...]
    local dir=$1 steps=$2 seed=$3
    shift 3
    [ -f "$dir/adapter.json" ] || limner pretrain "${common[@]}" --out "$dir" --steps "$steps" --seed "$seed" "$@"
}

stage "$out/stage1" 1400 0 --set lr_warmup_steps=100
stage "$out/stage2" 1500 1 --set lr_warmup_steps=50 --set init="$out/stage1"
stage "$out/stage3" 3000 2 --set lr_warmup_steps=50 --set init="$out/stage2"
stage "$out/stage4" 1500 3 --set lr_warmup_steps=0 --set lr_schedule=cosine --set lr_floor=0 --set init="$out/stage3"
stage "$out/stage5" 450 4 --set lr_warmup_steps=25 --set lr_schedule=cosine --set lr_floor=0 --set init="$out/stage4" \
    --set pose_controlnet=world
cp "$out/stage5/storymaker.safetensors" "$out/stage5/adapter.json" "$out/"
