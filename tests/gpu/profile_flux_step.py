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

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import torch  # noqa: E402

from comfy_xdit.config import ParallelConfig  # noqa: E402
from comfy_xdit.mesh import build_mesh  # noqa: E402
from comfy_xdit.models.flux import FluxModel, image_ids, pack_latents  # noqa: E402
from comfy_xdit.models.flux_random import flux_config, random_flux  # noqa: E402
from comfy_xdit.spmd import run_spmd  # noqa: E402


def _inputs(cfg, px, device, dtype, text_len=512):
    g = torch.Generator().manual_seed(11)
    h = w = px // 8
    return (pack_latents(torch.randn(1, 16, h, w, generator=g)).to(device, dtype),
            torch.randn(1, text_len, cfg["joint_attention_dim"], generator=g).to(device, dtype),
            torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
            torch.full((1,), 0.7, device=device), image_ids(h, w).to(device, dtype),
            torch.zeros(text_len, 3, device=device, dtype=dtype), torch.full((1,), 3.5, device=device))


def _rank(rank, world_size, px, out_dir):
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    cfg = flux_config("flux-dev")
    transformer = random_flux(cfg, seed=0, dtype=torch.bfloat16, device=device)
    args = _inputs(cfg, px, device, torch.bfloat16)
    model = FluxModel(transformer, build_mesh(ParallelConfig(ulysses_degree=world_size), device))
    model.compile_blocks()
    times = []
    with torch.inference_mode():
        for i in range(13):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model.forward(*args)
            end.record()
            end.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
        if out_dir:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    model.forward(*args)
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
