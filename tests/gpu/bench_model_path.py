"""KSampler on the xDiT MODEL (the stepwise path) against the Sampler (xDiT) (the fused path), in one ComfyUI
process on the GPUs present, FLUX.1-dev shapes, 28 steps: end-to-end seconds, the per-call overhead, and
EasyCache on the MODEL path (speed only: random weights say nothing of quality).

    python tests/gpu/bench_model_path.py --comfyui PATH/TO/ComfyUI --px 1024 [--px 2048] [--gpus 2] --json out.json

The transformer is FLUX.1-dev's shapes in ComfyUI's layout, bf16, written as a sparse file (the header is real,
the weights read as zeros: shapes, not values, decide speed). Both paths load it once (same worker model,
compiled blocks). Needs ComfyUI's source and its torchsde beside the pack's requirements.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import struct
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_sparse_flux(path: str, preset: str) -> dict:
    """A Flux preset's transformer in BFL keys under model.diffusion_model., bf16, every byte a hole of the file;
    returns its config."""
    from comfy_xdit.models.flux.checkpoint import diffusers_to_bfl
    from comfy_xdit.models.flux.family import FLUX

    config = FLUX.preset_config(preset)
    meta = FLUX.meta_model(config)
    header, offset = {}, 0
    for key, t in diffusers_to_bfl(meta.state_dict()).items():
        size = t.numel() * 2
        header["model.diffusion_model." + key] = {"dtype": "BF16", "shape": list(t.shape),
                                                  "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return config


def write_random_flux(path: str, preset: str) -> dict:
    """A Flux preset's transformer in BFL keys under model.diffusion_model., bf16, random N(0, 0.02) weights made
    on the GPU (EasyCache needs outputs that change, and zero weights would also run the GPU at lower power)."""
    import torch
    from safetensors.torch import save_file

    from comfy_xdit.models.flux.checkpoint import diffusers_to_bfl
    from comfy_xdit.models.flux.family import FLUX

    config = FLUX.preset_config(preset)
    g = torch.Generator("cuda").manual_seed(0)
    weights = {"model.diffusion_model." + k: (torch.randn(t.shape, generator=g, device="cuda") * 0.02)
               .to(torch.bfloat16).cpu() for k, t in diffusers_to_bfl(FLUX.meta_model(config).state_dict()).items()}
    save_file(weights, path)
    return config


def load_pack(comfyui: str):
    sys.path[:0] = [comfyui, ROOT]
    spec = importlib.util.spec_from_file_location("xdit_pack", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["xdit_pack"] = pack
    spec.loader.exec_module(pack)
    return pack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--preset", default="flux-dev", help="a Flux preset (tiny: a quick check on the CPU)")
    parser.add_argument("--px", type=int, action="append")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--random", action="store_true", help="random weights (on a GPU) instead of a sparse file")
    parser.add_argument("--json")
    args = parser.parse_args()
    pack = load_pack(args.comfyui)
    import torch

    import folder_paths
    import nodes as comfy_nodes
    from comfy_extras.nodes_easycache import EasyCacheNode

    models = "/tmp/cxd_bench_models"
    os.makedirs(models, exist_ok=True)
    path = os.path.join(models, f"{args.preset}_{'random' if args.random else 'sparse'}.safetensors")
    config = (write_random_flux if args.random else write_sparse_flux)(path, args.preset)
    folder_paths.add_model_folder_path("diffusion_models", models)
    M = pack.NODE_CLASS_MAPPINGS
    t0 = time.time()
    (xmodel,) = M["XDiTModelLoader"]().load(os.path.basename(path), "bf16", args.gpus, args.strategy,
                                            compile=torch.cuda.is_available())
    load_s = time.time() - t0
    (model,) = M["XDiTModelToComfy"]().convert(xmodel)
    cached = EasyCacheNode.execute(model, 0.2, 0.15, 0.95, False).result[0]
    g = torch.Generator().manual_seed(0)
    context, pooled = config["joint_attention_dim"], config["pooled_projection_dim"]
    cond = [[torch.randn(1, 512, context, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g),
                                                          "guidance": 3.5}]]
    calls = []  # (seconds in Engine.forward, seconds the workers took) per model call
    engine = pack.nodes.ENGINE
    pool = engine.pool(args.gpus)
    request = pool.request

    def timed(kind, *a, **k):
        t = time.perf_counter()
        reply = request(kind, *a, **k)
        if kind in ("forward", "sample"):
            calls.append((time.perf_counter() - t, reply[0].get("elapsed", 0.0), kind))
        return reply

    pool.request = timed
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = dict(preset=args.preset, device=device, gpus=args.gpus, strategy=args.strategy, steps=args.steps,
                   load_s=round(load_s, 2), sizes={})
    for px in args.px or [1024]:
        latent = {"samples": torch.zeros(1, 16, px // 8, px // 8)}

        def fused():
            return M["XDiTSampler"]().sample(xmodel, cond, cond, latent, 1, args.steps, 1.0, "euler", "simple", 1.0)

        def stepwise(m=model):
            return comfy_nodes.common_ksampler(m, 1, args.steps, 1.0, "euler", "simple", cond, cond, latent)

        row = {}
        for name, run in (("sampler_xdit", fused), ("ksampler_model", stepwise),
                          ("ksampler_model_easycache", lambda: stepwise(cached))):
            t = time.time()
            run()  # the first run compiles (new shapes) and, on the MODEL path, sends the conditioning
            first = time.time() - t
            times = []
            calls.clear()
            for _ in range(args.repeats):
                t = time.time()
                run()
                times.append(time.time() - t)
            steps = [c for c in calls if c[2] == "forward"]
            row[name] = dict(first_s=round(first, 2), best_s=round(min(times), 3),
                             times=[round(x, 3) for x in times], model_calls=len(steps) // args.repeats)
            if not steps:  # the fused path: the workers' time for the whole denoise, per step
                row[name]["worker_step_ms"] = round(1000 * min(c[1] for c in calls) / args.steps, 2)
            else:  # where a stepwise step's time goes: ComfyUI's side, the round trip, the workers
                wall = sum(c[0] for c in steps) / len(steps)
                worker = sum(c[1] for c in steps) / len(steps)
                row[name].update(call_ms=round(1000 * wall, 2), worker_ms=round(1000 * worker, 2),
                                 transport_ms=round(1000 * (wall - worker), 2),
                                 comfy_side_ms=round(1000 * (sum(times) / len(times) / args.steps - wall), 2))
            print(px, name, row[name], flush=True)
        per_call = (row["ksampler_model"]["best_s"] - row["sampler_xdit"]["best_s"]) / args.steps
        row["per_call_overhead_ms"] = round(1000 * per_call, 2)
        row["model_vs_sampler"] = round(row["ksampler_model"]["best_s"] / row["sampler_xdit"]["best_s"], 4)
        results["sizes"][px] = row
        print(px, "per-call overhead", row["per_call_overhead_ms"], "ms; MODEL / Sampler",
              row["model_vs_sampler"], flush=True)
    pack.nodes.ENGINE.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
