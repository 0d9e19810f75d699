"""Time and profile one Flux forward on 2 GPUs (full FLUX.1-dev shapes, random bf16 weights, compiled blocks,
Ulysses 2), outside the pool.

    python3 tests/gpu/profile_flux_step.py [--px 1024]

Prints one JSON line per rank: median and best forward ms over 10 (CUDA events) after 3 warm-ups (the first
compiles). With $OUT set, writes $OUT/profile_rank{r}.json, a Chrome trace of two more forwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from comfy_xdit.config import ParallelConfig  # noqa: E402
from comfy_xdit.mesh import build_mesh  # noqa: E402
from comfy_xdit.models.flux import FluxModel  # noqa: E402
from comfy_xdit.models.flux.random import flux_config, random_flux  # noqa: E402
from comfy_xdit.spmd import run_spmd  # noqa: E402
from tests.gpu.check_usp_cuda import _time_forward, _timing_inputs  # noqa: E402  (also turns NVLink multicast off)


def _rank(rank, world_size, px, out_dir):
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    cfg = flux_config("flux-dev")
    transformer = random_flux(cfg, seed=0, dtype=torch.bfloat16, device=device)
    inputs = _timing_inputs(cfg, (px // 8, px // 8), 512, device, torch.bfloat16)
    model = FluxModel(transformer, build_mesh(ParallelConfig(ulysses_degree=world_size), device))
    model.compile_blocks()
    times = _time_forward(model, inputs, device, warmup=3, iters=10)
    if out_dir:
        from torch.profiler import ProfilerActivity, profile
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                model.forward(**inputs)
            torch.cuda.synchronize()
        prof.export_chrome_trace(os.path.join(out_dir, f"profile_rank{rank}.json"))
    result = dict(rank=rank, px=px, median_ms=round(statistics.median(times), 2), min_ms=round(min(times), 2))
    print(json.dumps(result), flush=True)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--px", type=int, default=1024)
    a = p.parse_args()
    run_spmd(2, _rank, a.px, os.environ.get("OUT"), backend="nccl")


if __name__ == "__main__":
    main()
