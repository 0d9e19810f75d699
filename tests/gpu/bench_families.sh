#!/usr/bin/env bash
# One device call: SD3.5-Large shapes (1024 px, 28 steps, cfg 4.5) and FLUX.1-dev shapes (1024 px, 28 steps)
# through the pool on the GPUs present, each beside diffusers on one GPU. Results under $OUT (or out/gpu).
# Needs diffusers and yunchang importable (carried wheels on a bare device image).
set -u
out=${OUT:-out/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.txt"
gpus=$(nvidia-smi -L | wc -l)
list=1
[ "$gpus" -ge 2 ] && list=1,2
export PYTHONUNBUFFERED=1
# SD3 text: CLIP-L/G 77 tokens + T5 256, as diffusers' StableDiffusion3Pipeline gives them
timeout 330 python3 -m comfy_xdit.bench --preset sd3.5-large --cfg 4.5 --px 1024 --steps 28 --gpus "$list" \
    --strategies cfg_parallel,ulysses,auto --compile both --baseline --text-tokens 333 --json "$out/sd3.json" \
    2>&1 | tee "$out/sd3.log"
timeout 220 python3 -m comfy_xdit.bench --preset flux-dev --px 1024 --steps 28 --gpus 1 --compile on --baseline \
    --json "$out/flux.json" 2>&1 | tee "$out/flux.log"
