#!/usr/bin/env bash
# Build .venv-comfyui: the Python that runs a real ComfyUI server for tests/comfyui (the tests themselves run
# in .venv). torch and torchvision first (COMFYUI_TORCH_SPEC overrides; the default CUDA builds run on the CPU
# too, and ComfyUI imports torchvision at start-up, which the CPU-only torch 2.13 has no working build of), then
# ComfyUI's requirements.txt without its torch/torchvision/torchaudio lines, then the pack's requirements.txt;
# torch and torchvision stay pinned throughout. Quick when already built (a stamp of its inputs).
# ComfyUI is found as the tests find it: COMFYUI_DIR, the ComfyUI the pack is installed in, ../shared/comfyui.
# On failure it leaves the reason in .venv-comfyui.failed (the tests skip with it) and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-comfyui
FAILED=.venv-comfyui.failed
STAMP="$VENV/.cxd-setup-stamp"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${COMFYUI_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
rm -f "$FAILED"

fail() {
    { echo "$1"; [ -f "$TMP/out" ] && tail -n 25 "$TMP/out"; } > "$FAILED"
    echo "setup_comfyui: $1 (details in $FAILED)" >&2
    exit 1
}

is_comfyui() { [ -f "$1/main.py" ] && [ -d "$1/comfy" ]; }
if [ -n "${COMFYUI_DIR:-}" ]; then
    is_comfyui "$COMFYUI_DIR" || fail "COMFYUI_DIR=$COMFYUI_DIR is not a ComfyUI folder (no main.py and comfy/)"
    COMFY=$COMFYUI_DIR
elif [ "$(basename "$(dirname "$PWD")")" = custom_nodes ] && is_comfyui "$PWD/../.."; then
    COMFY=$PWD/../..
elif is_comfyui ../shared/comfyui; then
    COMFY=../shared/comfyui
else
    fail "no ComfyUI found (set COMFYUI_DIR, install the pack in ComfyUI/custom_nodes, or provide ../shared/comfyui)"
fi

# ComfyUI's requirements without torch, torchvision, torchaudio (exact names: torchsde stays)
grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[#].*)?$' "$COMFY/requirements.txt" \
    > "$TMP/comfyui-requirements.txt"
for spec in $TORCH_SPEC; do echo "$spec"; done > "$TMP/constraints.txt"  # nothing later may swap torch

stamp=$({ "$PYTHON" --version 2>&1; echo "$TORCH_SPEC"; cat "$TMP/comfyui-requirements.txt" requirements.txt \
          scripts/setup_comfyui.sh; } \
        | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$stamp" ] \
   && versions=$("$VENV/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)' 2>/dev/null); then
    echo "setup_comfyui: $VENV is ready ($versions)"
    exit 0
fi

pip() {  # quiet, its output kept for the failure report
    "$VENV/bin/python" -m pip install -q --progress-bar off "$@" > "$TMP/out" 2>&1 || { cat "$TMP/out" >&2; return 1; }
}
echo "setup_comfyui: building $VENV for ComfyUI in $COMFY (torch: $TORCH_SPEC)"
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" > "$TMP/out" 2>&1 || fail "$PYTHON -m venv $VENV failed"
# shellcheck disable=SC2086
pip $TORCH_SPEC || fail "pip install $TORCH_SPEC failed"
pip -c "$TMP/constraints.txt" -r "$TMP/comfyui-requirements.txt" || fail "pip install of ComfyUI's requirements failed"
pip -c "$TMP/constraints.txt" -r requirements.txt || fail "pip install of the pack's requirements.txt failed"
"$VENV/bin/python" -W ignore -c "import torch, torchvision, torchsde, einops, aiohttp, transformers, safetensors, av, diffusers, yunchang
print('setup_comfyui: torch', torch.__version__, 'torchvision', torchvision.__version__, 'diffusers', diffusers.__version__)" \
    > "$TMP/out" 2>&1 || fail "$VENV cannot import what ComfyUI and the pack need"
cat "$TMP/out"
echo "$stamp" > "$STAMP"
echo "setup_comfyui: $VENV ready in $(( $(date +%s) - start )) s"
