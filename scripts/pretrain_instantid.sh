#!/usr/bin/env bash
# Pretrains the world's InstantID adapter into DIR (default .limner-pretrain/instantid): 1500 steps of batch 8 on the
# world's identity stream (characters only, 80% portraits; each target paired with another view of the same person
# in another shirt, pose, place and size), one thread, as the shipped one was on a 2-core machine beside other jobs.
# The paper's recipe: UNet, VAE and text encoder frozen; the Image Adapter (a Resampler of width 128 on the world,
# 2 heads, 16 ID tokens, reading the world face analyser's 128-d identity embedding of the reference, and every
# attn2's to_k_ip / to_v_ip) and the IdentityNet (a ControlNet copied from the world UNet, its condition image the
# target's 5 face keypoints from the renderer drawn as the official draw_kps draws them, its cross-attention
# reading the ID tokens only) learn the noise-prediction MSE; no text or image dropping; captions name the class
# and the place, not the looks (captions=class). AdamW 1e-4, weight decay 0.01. Resumable: after an interruption,
# run it again and it continues from its last checkpoint (every 250 steps), its data stream where it was. It fed
# the Resampler the unit face embedding (embedding_norm=1); limner's default is now sqrt(128) (the official input
# scale), which a 900-step run did not improve on the world bench (docs/world-bench-identities/instantid.md):
# embedding_norm=1 reproduces the shipped adapter.
# DIR keeps the full IdentityNet (diffusers' ControlNetModel/, what a real base's users want); the shipped adapter
# (src/limner/assets/world/adapters/instantid/) is DIR-shipped, written last: the IdentityNet stored as a delta
# against the world UNet, each copied matrix's change truncated to 98% of its energy (scripts/compact_instantid.py;
# adapter.json's identitynet_delta records how and the sha256 of DIR's full weights).
set -euo pipefail
out=${1:-.limner-pretrain/instantid}
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
limner pretrain --method instantid --data world --out "$out" --steps "${STEPS:-1500}" --batch-size 8 --lr 1e-4 \
    --seed 0 --set checkpoint_every=250 --set embedding_norm=1 --resume latest
python "$(dirname "$0")/compact_instantid.py" "$out" "$out-shipped" --energy 0.98
