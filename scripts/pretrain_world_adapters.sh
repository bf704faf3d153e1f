#!/usr/bin/env bash
# Pretrains the world's IP-Adapters into DIR (default .limner-pretrain/): plain (5000 steps) and plus (4000 steps,
# Resampler width 256) side by side, one thread each, as the shipped ones were on a 2-core machine (about 40 and
# 50 minutes there). On the world the pairing and captions default to pair=view, captions=class (adapter.json
# records them). Resumable: after an interruption, run it again and each run continues from its last checkpoint
# (every 250 steps), its data stream where it was. The shipped adapters (src/limner/assets/world/adapters/) are
# these folders' ip_adapter.safetensors and adapter.json.
set -euo pipefail
out=${1:-.limner-pretrain}
# one thread each, waiting passively: two torch processes spinning on the same two cores slow each other
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
common=(--method ip_adapter --data world --batch-size 8 --set checkpoint_every=250 --resume latest)
limner pretrain "${common[@]}" --steps "${PLAIN_STEPS:-5000}" --set variant=plain --out "$out/ip_adapter-plain" &
plain=$!
limner pretrain "${common[@]}" --steps "${PLUS_STEPS:-4000}" --set variant=plus --set resampler_dim=256 \
    --out "$out/ip_adapter-plus" &
plus=$!
wait "$plain"
wait "$plus"
