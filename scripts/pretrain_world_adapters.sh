#!/usr/bin/env bash
# Pretrains the world's IP-Adapters, plain then plus, into DIR (default .limner-pretrain/). Resumable: after an
# interruption, run it again and each run continues from its last checkpoint (every 250 steps), its data stream
# where it was. The shipped adapters (src/limner/assets/world/adapters/) are these folders without checkpoints/.
set -euo pipefail
out=${1:-.limner-pretrain}
steps=${STEPS:-8000}
# torch's threads wait passively: beside another torch process on the same cores, spinning threads slow both
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
common=(--method ip_adapter --data world --steps "$steps" --batch-size 8 --set checkpoint_every=250 --resume latest)
limner pretrain "${common[@]}" --set variant=plain --out "$out/ip_adapter-plain"
limner pretrain "${common[@]}" --set variant=plus --set resampler_dim=256 --out "$out/ip_adapter-plus"
