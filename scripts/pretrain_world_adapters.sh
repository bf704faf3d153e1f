#!/usr/bin/env bash
# Pretrains the world's IP-Adapters into DIR (default .limner-pretrain/), as the shipped ones
# (src/limner/assets/world/adapters/: these folders' ip_adapter.safetensors and adapter.json) were made on a 2-core
# machine. On the world, captions default to captions=class: the subject's looks left to the image prompt.
#   plus stage 1, DIR/ip_adapter-plus-stage1: 4000 steps of batch 8, Resampler width 256, each sample conditioned on
#     another view of its subject cut out on grey (pair=view), AdamW 1e-4 constant, seed 0, one thread (47 minutes).
#   plain stage 1, DIR/ip_adapter-plain-stage1: 5000 steps, pair=view, the same rate and seed, one thread beside
#     plus (about 40 minutes; the shipped plain until session 15: subject fidelity 0.359).
#   plain, DIR/ip_adapter-plain: 1500 more steps from stage 1's weights (--set init=), each sample conditioned on
#     the target itself cut out on grey (pair=cut, FastComposer's pairing, now the world's default), fresh samples
#     (seed 7), the rate cooled from 1e-4 to 0 on a cosine, both threads (7 minutes; shipped in session 15:
#     subject fidelity 0.403). Continued 5000 steps more (seed 8, the same cosine after 100 warm-up steps) it
#     read 0.376: not shipped.
#   plus, DIR/ip_adapter-plus: the same 1500 more steps from plus stage 1 (7.5 minutes; subject fidelity 0.249 ->
#     0.371, shipped at the end of session 15).
# Resumable: after an interruption, run it again and each run continues from its last checkpoint (every 250
# steps), its data stream where it was; a finished stage is not run again.
set -euo pipefail
out=${1:-.limner-pretrain}
common=(--method ip_adapter --data world --batch-size 8 --set checkpoint_every=250 --resume latest)
if [ ! -f "$out/ip_adapter-plain-stage1/adapter.json" ] || [ ! -f "$out/ip_adapter-plus-stage1/adapter.json" ]; then
    # one thread each, waiting passively: two torch processes spinning on the same two cores slow each other
    export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
    limner pretrain "${common[@]}" --steps 5000 --set variant=plain --set pair=view \
        --out "$out/ip_adapter-plain-stage1" &
    plain=$!
    limner pretrain "${common[@]}" --steps 4000 --set variant=plus --set resampler_dim=256 --set pair=view \
        --out "$out/ip_adapter-plus-stage1" &
    plus=$!
    wait "$plain"
    wait "$plus"
    unset OMP_NUM_THREADS OMP_WAIT_POLICY
fi
limner pretrain "${common[@]}" --steps 1500 --seed 7 --set variant=plain --set lr_schedule=cosine \
    --set init="$out/ip_adapter-plain-stage1" --out "$out/ip_adapter-plain"
limner pretrain "${common[@]}" --steps 1500 --seed 7 --set variant=plus --set resampler_dim=256 \
    --set lr_schedule=cosine --set init="$out/ip_adapter-plus-stage1" --out "$out/ip_adapter-plus"
