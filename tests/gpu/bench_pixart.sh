#!/usr/bin/env bash
# One device call (600 s): PixArt-Σ shapes (preset pixart-sigma-xl-2-2048: 0.6B, 28 blocks of width 1152, 16 heads
# of 72, random bf16 weights) at 2048x2048 (latent 256x256, 128x128 = 16,384 image tokens), 120 text tokens (a long
# prompt through ComfyUI's T5-XXL, which does not pad; diffusers pads to 300 under a mask, so both sides get the
# same 120 unmasked states here; the negative has the same length), cfg 4.5 with a negative prompt, 20 steps
# (the pool: euler / simple; diffusers: the release's DPMSolverMultistepScheduler; one model call a step in
# both), through the pool on the GPUs present, beside diffusers' PixArtSigmaPipeline (latent out, no text encoder
# or VAE, no resolution binning) on one GPU in the same call:
#   pixart_1gpu           1 GPU, eager and compiled, and the diffusers baseline
#   pixart_2gpu           2 GPUs (when present): cfg_parallel, ulysses, pipefusion and auto, eager; speedups over
#                         pixart_1gpu's diffusers time
#   pixart_2gpu_compiled  2 GPUs: auto (cfg_parallel expected), compiled
# Results under $OUT (or out/gpu): gpus.txt, pixart.log (everything printed) and one JSON per part.
# Needs diffusers and yunchang importable (carried wheels on a bare device image; transformers is on the image).
#
# Estimate (H200; FLOPs from the shapes: 51.9 TFLOP a forward at 16,384 + 120 tokens = 34.6 in self-attention
# (4 s^2 d a block: two thirds of the work, head dim 72), 17.1 in the linears (q, k, v, o, cross q, o, 4x MLP:
# 28 s d^2 a block), 0.3 in cross-attention; 104 TFLOP a step with cfg, 2.1 PFLOP for 20 steps):
#   pixart_1gpu: attention at ~300-350 TFLOP/s (head dim 72: kernels sized for 96), linears at ~600 -> ~0.27-0.33 s
#     a step, ~5.5-7 s for 20 steps in diffusers (+ ~15 s import, random weights, 2 warm-up steps); pool start
#     ~20 s; eager ~5.5-7 s (+ load, 2 warm-up steps: ~6 s); compiled ~5-6 s (+ load and the compile in a 3-step
#     warm-up: ~40-90 s). About 100-150 s.
#   pixart_2gpu: pool start ~20 s; per strategy load ~5 s, warm-up ~1 s, ~2.8-3.5 s timed (cfg_parallel and
#     auto: half the work per GPU; ulysses 2: two all-to-alls of 16k x 1152 a block; pipefusion 2: 14 blocks a
#     stage, 2 patches). About 60 s.
#   pixart_2gpu_compiled: pool start ~20 s, compile ~40-90 s (warm inductor caches), ~3 s timed. About 70-115 s.
#   1 GPU: ~100-150 s; 2 GPUs: ~230-330 s. Neither the timed steps nor the warm-ups are cut to fit.
#   Each part gets a timeout from what is left of DEADLINE (585 s) less what the later parts need, so a slow part
#   cannot take the later ones' time; a part stopped by its timeout gets SIGINT first (the pool shuts down).
#
# A dry run of this script's logic on CPU ranks with the tiny preset: DRY_CPU=1 [GPUS=2] [PYTHON=...] bash
# tests/gpu/bench_pixart.sh (the diffusers baseline is left out where $PYTHON has no transformers).
set -u
out=${OUT:-out/gpu}
mkdir -p "$out"
log=$out/pixart.log
: > "$log"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
deadline=${DEADLINE:-585}
preset=pixart-sigma-xl-2-2048 px=2048 steps=20 tokens=120 compile1=both compile2=on dev=() baseline=(--baseline)
if [ -n "${DRY_CPU:-}" ]; then  # no GPU, no compile: tiny shapes, 2 steps
  preset=tiny-pixart-sigma px=64 steps=2 tokens=8 compile1=off compile2=off dev=(--device cpu)
  gpus=${GPUS:-2}
  echo "dry run on CPU ranks, $gpus ranks" | tee "$out/gpus.txt" "$log"
  if ! "$py" -c "import transformers" 2>/dev/null; then
    baseline=()
    echo "no transformers in $py: no diffusers baseline" | tee -a "$log"
  fi
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.txt" "$log"
  gpus=$(nvidia-smi -L | wc -l)
fi
job=(--preset "$preset" --px "$px" --cfg 4.5 --steps "$steps" --text-tokens "$tokens" "${dev[@]}")

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
  [ -s "$out/pixart_1gpu.json" ] && echo "--baseline-from $out/pixart_1gpu.json"
}

if [ "$gpus" -ge 2 ]; then
  part pixart_1gpu 190 "${job[@]}" --gpus 1 --strategies auto --compile "$compile1" "${baseline[@]}"
  # shellcheck disable=SC2046
  part pixart_2gpu 120 "${job[@]}" --gpus 2 --strategies cfg_parallel,ulysses,pipefusion,auto --compile off \
      $(baseline_from)
  # shellcheck disable=SC2046
  part pixart_2gpu_compiled 0 "${job[@]}" --gpus 2 --strategies auto --compile "$compile2" $(baseline_from)
else
  part pixart_1gpu 0 "${job[@]}" --gpus 1 --strategies auto --compile "$compile1" "${baseline[@]}"
fi
echo "== done at $SECONDS s" | tee -a "$log"
