#!/usr/bin/env bash
# One device call (600 s): Qwen-Image shapes (preset qwen-image: 20.4B, 60 dual-stream blocks of width 3072,
# random bf16 weights) at 1328x1328 (latent 166x166, 83x83 = 6889 image tokens), 128 text tokens (a prompt through
# ComfyUI's Qwen2.5-VL text encoder, template dropped; the negative has the same length), cfg 4 with a negative
# prompt, 50 steps, through the pool on the GPUs present, beside diffusers' QwenImagePipeline (latent out, no text
# encoder or VAE) on one GPU in the same call:
#   qwen_1gpu         1 GPU, auto, eager and compiled, and the diffusers baseline
#   qwen_2gpu         2 GPUs (when present): cfg_parallel and auto, compiled (eager left out for time: qwen_1gpu
#                     shows what compiling buys); speedups over qwen_1gpu's diffusers time
#   qwen_2gpu_cap24   2 GPUs, each worker capped at 24 GB, auto, eager: a layout that fits (PipeFusion and/or
#                     fp8), or the pool's refusal (or, should sampling run out of memory, the failure) as a row
#   qwen_2gpu_cap24_fp8  (with the time left) the same with fp8 weights asked for: auto's layout for fp8 storage
#   qwen_1gpu_cap24   (1 GPU only, with the time left) 1 GPU capped at 24 GB, auto: fp8 or the pool's refusal
# Results under $OUT (or out/gpu): gpus.txt, qwen.log (everything printed) and one JSON per part.
# Needs diffusers and yunchang importable (carried wheels on a bare device image; transformers is on the image).
#
# Estimate (H200; FLOPs from the shapes: 131.7 TFLOP a forward at 6889 + 128 tokens = 95.4 in the linears, each
# token through its own stream's q, k, v, o and 4x MLP, + 36.3 in joint attention; 263 TFLOP a step with cfg):
#   qwen_1gpu: diffusers ~480 TFLOP/s -> 0.55 s a step, 27 s for 50 steps (+ ~15 s import, random weights,
#     2 warm-up steps); pool start ~20 s; eager ~28 s (+ load, 2 warm-up steps: ~7 s); compiled ~560 TFLOP/s ->
#     ~24 s (+ load and the compile in a 3-step warm-up: ~45-90 s). About 190 s, 250 s if the compile is slow.
#   qwen_2gpu: cfg_parallel halves the work per GPU: ~12 s a compiled run (+ compile ~60 s); auto (cfg_parallel
#     expected) ~12 s (+ a recompile, ~30 s warm caches); pool start ~20 s. About 150 s.
#   qwen_2gpu_cap24: pool start ~20 s, PipeFusion 2 (bf16, if the 24 GB estimate lets it through) ~0.4 s a step,
#     ~20 s, or a refusal at load in seconds. About 50 s. qwen_2gpu_cap24_fp8 (cfg_parallel fp8 expected): ~45 s.
#   qwen_1gpu_cap24: fp8 upcasts every step: ~0.65 s a step, ~33 s (+ pool start and load ~25 s). About 60 s.
#   1 GPU: ~250-310 s; 2 GPUs: ~430-500 s. All 50 steps fit: neither the timed steps nor the warm-ups are cut.
#   Each part gets a timeout from what is left of DEADLINE (585 s) less what the later parts need, so a slow part
#   cannot take the later ones' time; a part stopped by its timeout gets SIGINT first (the pool shuts down).
#
# A dry run of this script's logic on CPU ranks with the tiny preset: DRY_CPU=1 [GPUS=2] bash tests/gpu/bench_qwen.sh
set -u
out=${OUT:-out/gpu}
mkdir -p "$out"
log=$out/qwen.log
: > "$log"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
deadline=${DEADLINE:-585}
preset=qwen-image px=1328 steps=50 tokens=128 compile1=both compile2=on dev=()
if [ -n "${DRY_CPU:-}" ]; then  # no GPU, no compile: tiny shapes, 2 steps
  preset=tiny-qwen-image px=64 steps=2 tokens=8 compile1=off compile2=off dev=(--device cpu)
  gpus=${GPUS:-2}
  echo "dry run on CPU ranks, $gpus ranks" | tee "$out/gpus.txt" "$log"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.txt" "$log"
  gpus=$(nvidia-smi -L | wc -l)
fi
job=(--preset "$preset" --px "$px" --cfg 4 --steps "$steps" --text-tokens "$tokens" "${dev[@]}")

part() {  # part NAME RESERVE ARGS...: the bench with the time left before the deadline, less RESERVE s
  local name=$1 reserve=$2 t rc
  shift 2
  t=$(( deadline - SECONDS - reserve ))
  if (( t < 40 )); then
    echo "== $name: skipped, $(( deadline - SECONDS )) s left" | tee -a "$log"
    return
  fi
  echo "== $name (timeout $t s): $py -m comfy_xdit.bench $*" | tee -a "$log"
  timeout -s INT -k 20 "$t" "$py" -m comfy_xdit.bench "$@" --json "$out/$name.json" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc at $SECONDS s" | tee -a "$log"
}

baseline_from() {  # the 1-GPU part's diffusers time, where it got that far
  [ -s "$out/qwen_1gpu.json" ] && echo "--baseline-from $out/qwen_1gpu.json"
}

if [ "$gpus" -ge 2 ]; then
  part qwen_1gpu 250 "${job[@]}" --gpus 1 --strategies auto --compile "$compile1" --baseline
  # shellcheck disable=SC2046
  part qwen_2gpu 95 "${job[@]}" --gpus 2 --strategies cfg_parallel,auto --compile "$compile2" $(baseline_from)
  # shellcheck disable=SC2046
  part qwen_2gpu_cap24 45 "${job[@]}" --gpus 2 --strategies auto --memory-cap-gb 24 --compile off $(baseline_from)
  # shellcheck disable=SC2046
  part qwen_2gpu_cap24_fp8 0 "${job[@]}" --gpus 2 --strategies auto --memory-cap-gb 24 --weight-dtype fp8_e4m3fn \
      --compile off $(baseline_from)
else
  part qwen_1gpu 70 "${job[@]}" --gpus 1 --strategies auto --compile "$compile1" --baseline
  # shellcheck disable=SC2046
  part qwen_1gpu_cap24 0 "${job[@]}" --gpus 1 --strategies auto --memory-cap-gb 24 --compile off $(baseline_from)
fi
echo "== done at $SECONDS s" | tee -a "$log"
