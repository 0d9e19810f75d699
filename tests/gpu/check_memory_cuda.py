"""CUDA check of the memory estimator and fp8 storage on full-size FLUX.1-dev shapes (random weights).

Run from the repository root:  python3 tests/gpu/check_memory_cuda.py [--parts model,compile,pool]

- model: for bf16 and fp8_e4m3fn storage, resident weight bytes against estimate_memory's weights
  term; the forward's peak memory above the weights at 1024 and 2048 px against its activations term;
  time per forward; the fp8 model's output against the bf16 model's.
- compile: time per forward at 1024 px with every block compiled (FluxModel.compile_blocks), bf16 and fp8.
- pool: this process holds all but 16 GB of the GPU; through a 1-GPU pool, bf16 must be refused with
  the estimator's message, fp8 must load and sample 1024 px (its peak memory is reported).
- pipefusion (2 GPUs): pipefusion 2 through the pool, bf16 and fp8, 1024 and 2048 px: each rank's
  peak memory against the estimate for its stage.

One JSON object per line on stdout, also appended to $OUT/memory_cuda.jsonl when OUT is set.
Numbers are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from comfy_xdit.config import ParallelConfig  # noqa: E402
from comfy_xdit.memory import GB, TEXT_TOKENS, estimate_memory  # noqa: E402
from comfy_xdit.models.flux import FLUX, FluxModel, image_ids  # noqa: E402
from comfy_xdit.models.flux.checkpoint import store_blocks_fp8  # noqa: E402
from comfy_xdit.models.flux.random import flux_config, random_flux  # noqa: E402


def emit(**record):
    line = json.dumps(record)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "memory_cuda.jsonl"), "a") as f:
            f.write(line + "\n")


def inputs(px: int, device, dtype):
    g = torch.Generator(device).manual_seed(0)
    h = w = px // 8
    tokens = (h // 2) * (w // 2)
    return dict(hidden_states=torch.randn(1, tokens, 64, generator=g, device=device, dtype=dtype),
                encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 4096, generator=g, device=device, dtype=dtype),
                pooled_projections=torch.randn(1, 768, generator=g, device=device, dtype=dtype),
                timestep=torch.full((1,), 0.5, device=device), guidance=torch.full((1,), 3.5, device=device),
                img_ids=image_ids(h, w).to(device, dtype),
                txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype))


@torch.inference_mode()
def measure(model, storage: str, config: dict, device, outputs: dict):
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated(device)
    est = estimate_memory(FLUX, config, ParallelConfig(), storage)[0]
    emit(storage=storage, weights_gb=weights / GB, estimate_weights_gb=est.weights / GB)
    for px in (1024, 2048):
        x = inputs(px, device, torch.bfloat16)
        model(**x, return_dict=False)  # warm-up (cuDNN plans, allocator)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            out = model(**x, return_dict=False)[0]
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated(device) - base
        act = estimate_memory(FLUX, config, ParallelConfig(), storage, image_size=(px, px))[0].activations
        emit(storage=storage, px=px, forward_ms=1000 * min(times), peak_above_weights_gb=peak / GB,
             estimate_activations_gb=act / GB, free_gb=torch.cuda.mem_get_info(device)[0] / GB)
        outputs[px] = out.float().cpu()
        del out, x


def part_model(device, config):
    model = random_flux(config, seed=0, dtype=torch.bfloat16, device=device)
    bf16, fp8 = {}, {}
    measure(model, "bf16", config, device, bf16)
    store_blocks_fp8(model)
    torch.cuda.empty_cache()
    measure(model, "fp8_e4m3fn", config, device, fp8)
    for px in bf16:
        err = float((fp8[px] - bf16[px]).norm() / bf16[px].norm())
        emit(px=px, fp8_vs_bf16_rel_err=err, output_std=float(bf16[px].std()))


@torch.inference_mode()
def part_compile(device, config):
    for storage in ("bf16", "fp8_e4m3fn"):
        transformer = random_flux(config, seed=0, dtype=torch.bfloat16, device=device)
        if storage != "bf16":
            store_blocks_fp8(transformer)
        model = FluxModel(transformer)
        model.compile_blocks()
        x = inputs(1024, device, torch.bfloat16)
        t = time.perf_counter()
        transformer(**x, return_dict=False)
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        times = []
        for _ in range(5):
            t = time.perf_counter()
            transformer(**x, return_dict=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        emit(storage=storage, px=1024, compiled=True, first_call_s=first, forward_ms=1000 * min(times))
        del model, transformer, x
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def part_pool(device, config):
    from comfy_xdit.pool.controller import PoolOptions, RequestFailed, WorkerPool

    hold = torch.empty(torch.cuda.mem_get_info(device)[0] - 16 * GB, dtype=torch.uint8, device=device)
    emit(held_gb=hold.numel() / GB, free_gb=torch.cuda.mem_get_info(device)[0] / GB)
    pool = WorkerPool(PoolOptions(nproc=1, device="cuda", start_timeout=600))
    try:
        try:
            pool.request("load_model", dict(random_preset="flux-dev", dtype="bf16"))
            emit(bf16="loaded (not refused)")
        except RequestFailed as e:
            emit(bf16_refused=str(e), kind=e.kind)
        key = pool.request("load_model", dict(random_preset="flux-dev", dtype="fp8_e4m3fn"))[0]["model_key"]
        g = torch.Generator().manual_seed(0)
        tensors = {"positive.context": torch.randn(1, TEXT_TOKENS, 4096, generator=g),
                   "positive.pooled": torch.randn(1, 768, generator=g),
                   "latent": torch.zeros(1, 16, 128, 128)}
        reply, out = pool.request("sample", {"model_key": key, "seed": 0, "steps": 4}, tensors)
        emit(fp8_sampled=True, elapsed_s=reply["elapsed"], peak_gb=[p / GB for p in reply["peak_memory"]],
             finite=bool(torch.isfinite(out["samples"]).all()))
    finally:
        pool.shutdown()
        del hold


def part_pipefusion(device, config):
    from comfy_xdit.pool.controller import PoolOptions, WorkerPool

    pool = WorkerPool(PoolOptions(nproc=2, device="cuda", start_timeout=600))
    try:
        for storage in ("bf16", "fp8_e4m3fn"):
            key = pool.request("load_model", dict(random_preset="flux-dev", dtype=storage,
                                                  parallel={"pipefusion_degree": 2}, num_pipeline_patch=2,
                                                  warmup_steps=1))[0]["model_key"]
            for px in (1024, 2048):
                g = torch.Generator().manual_seed(0)
                tensors = {"positive.context": torch.randn(1, TEXT_TOKENS, 4096, generator=g),
                           "positive.pooled": torch.randn(1, 768, generator=g),
                           "latent": torch.zeros(1, 16, px // 8, px // 8)}
                reply, _ = pool.request("sample", {"model_key": key, "seed": 0, "steps": 3}, tensors)
                est = estimate_memory(FLUX, config, ParallelConfig(pipefusion_degree=2), storage,
                                      image_size=(px, px))
                emit(storage=storage, pipefusion=2, px=px, elapsed_s=reply["elapsed"],
                     peak_gb=[p / GB for p in reply["peak_memory"]], estimate_gb=[e.total / GB for e in est],
                     estimate_weights_gb=[e.weights / GB for e in est])
            pool.request("unload_model", {"model_key": key})
    finally:
        pool.shutdown()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="model,compile,pool")
    parts = parser.parse_args().parts.split(",")
    device = torch.device("cuda:0")
    emit(torch=torch.__version__, device=torch.cuda.get_device_name(device))
    config = flux_config("flux-dev")
    for name in parts:
        globals()[f"part_{name}"](device, config)


if __name__ == "__main__":
    main()
