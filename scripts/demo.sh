#!/usr/bin/env bash
# Set up (if needed) and run the embedded default job: a small random-weight Flux-shaped
# model on 2 CPU ranks vs 1 process; prints agreement and timing, writes out/demo/*.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m comfy_xdit.demo "$@"
