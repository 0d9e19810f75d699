#!/usr/bin/env bash
# One device call: Wan 2.1 T2V shapes at 832x480, 81 frames (21 latent frames, 32,760 video tokens), cfg 5 with a
# negative prompt, through the pool on the GPUs present (eager and compiled), beside diffusers' WanPipeline on one
# GPU in the same call. 14B: STEPS14 steps (a forward is ~3 s, so 40 steps do not fit one call beside the
# baseline); 1.3B: 40 steps. Results under $OUT (or out/gpu). Needs diffusers and yunchang importable.
set -u
out=${OUT:-out/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.txt"
gpus=$(nvidia-smi -L | wc -l)
list=1
[ "$gpus" -ge 2 ] && list=1,2
export PYTHONUNBUFFERED=1
which=${WHICH:-14b,1.3b}
if [[ $which == *14b* ]]; then
  timeout 560 python3 -m comfy_xdit.bench --preset wan2.1-t2v-14b --px 832x480 --frames 81 --cfg 5 \
      --steps "${STEPS14:-8}" --gpus "$list" --strategies cfg_parallel,ulysses,auto --compile both --baseline \
      --text-tokens 512 --json "$out/wan14b.json" 2>&1 | tee "$out/wan14b.log"
fi
if [[ $which == *1.3b* ]]; then
  timeout 560 python3 -m comfy_xdit.bench --preset wan2.1-t2v-1.3b --px 832x480 --frames 81 --cfg 5 --steps 40 \
      --gpus "$list" --strategies cfg_parallel,ulysses,auto --compile both --baseline --text-tokens 512 \
      --json "$out/wan1.3b.json" 2>&1 | tee "$out/wan1.3b.log"
fi
