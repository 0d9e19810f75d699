"""The embedded default job: a small Flux-shaped model with random weights, sampled on one
process and on N CPU ranks with sequence parallelism; prints their agreement and timings and
writes a PNG of the result. Needs no downloaded weights.

    python -m comfy_xdit.demo [--ranks 2] [--layout ulysses|ring|hybrid] [--out out/demo]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from .config import ParallelConfig
from .mesh import build_mesh
from .models.flux import FluxModel, flux_conditioning
from .models.flux.checkpoint import write_flux_checkpoint
from .models.flux.random import flux_config, random_flux
from .sampling import sample
from .spmd import run_spmd


def _layout(name: str, ranks: int) -> ParallelConfig:
    if name == "ulysses":
        return ParallelConfig(ulysses_degree=ranks)
    if name == "ring":
        return ParallelConfig(ring_degree=ranks)
    if name == "hybrid":
        if ranks % 2:
            raise SystemExit("--layout hybrid needs an even number of ranks")
        return ParallelConfig(ulysses_degree=2, ring_degree=ranks // 2)
    raise SystemExit(f"unknown layout {name!r}")


def _job(path: str, args, mesh=None):
    model = FluxModel.load(path, dtype=torch.float32, mesh=mesh)
    cfg = model.config
    g = torch.Generator().manual_seed(args.seed)
    context = torch.randn(1, args.text_tokens, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g)
    latent = torch.zeros(1, 16, args.height // 8, args.width // 8)  # as EmptySD3LatentImage gives
    start = time.perf_counter()
    out = sample(model, flux_conditioning(context, pooled, 3.5), latent, seed=args.seed, steps=args.steps)
    return out, time.perf_counter() - start


def _rank_job(rank: int, world_size: int, path: str, args):
    mesh = build_mesh(_layout(args.layout, world_size), "cpu")
    return _job(path, args, mesh)


def latent_preview(latent: torch.Tensor, scale: int = 8) -> np.ndarray:
    """RGB picture of a 16-channel latent: a fixed projection, normalised per image (not a VAE decode)."""
    weights = torch.Generator().manual_seed(0)
    proj = torch.randn(latent.shape[1], 3, generator=weights)
    rgb = torch.einsum("chw,cd->hwd", latent[0].float(), proj)
    rgb = (rgb - rgb.amin()) / (rgb.amax() - rgb.amin() + 1e-8)
    rgb = rgb.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return (rgb.numpy() * 255).round().astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layout", default="ulysses", choices=["ulysses", "ring", "hybrid"])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--text-tokens", type=int, default=256, help="T5 length (Flux uses max(256, tokens))")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=os.path.join("out", "demo"))
    args = parser.parse_args(argv)
    if args.width % 16 or args.height % 16:
        parser.error("width and height must be multiples of 16")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "flux_demo_random.safetensors")
    config = flux_config("demo")
    write_flux_checkpoint(random_flux(config, seed=args.seed), path, layout="bfl")
    print(f"model: Flux-shaped, random weights, {config['num_layers']}+{config['num_single_layers']} blocks, "
          f"{config['num_attention_heads']} heads x {config['attention_head_dim']} (BFL layout: {path})")
    print(f"job: {args.width}x{args.height} px, {args.steps} steps, text {args.text_tokens} tokens, seed {args.seed}")

    torch.set_num_threads(1)  # the same per-process thread budget as each rank
    single, single_s = _job(path, args)
    print(f"1 process:            {single_s:6.2f} s")
    layout = _layout(args.layout, args.ranks)
    per_rank = run_spmd(args.ranks, _rank_job, path, args)
    parallel, parallel_s = per_rank[0]
    degrees = ", ".join(f"{k} {v}" for k, v in layout.as_dict().items() if v > 1)
    print(f"{args.ranks} CPU ranks ({degrees}): {parallel_s:6.2f} s")
    rel_err = float((parallel - single).norm() / single.norm())
    ranks_agree = all(torch.equal(r[0], parallel) for r in per_rank)
    print(f"parallel vs single process: relative error {rel_err:.2e} "
          f"({'OK' if rel_err <= 1e-4 else 'MISMATCH'}, bound 1e-4); all ranks hold the same result: {ranks_agree}")

    from PIL import Image

    png = os.path.join(args.out, "demo_latent_preview.png")
    Image.fromarray(latent_preview(parallel)).save(png)
    torch.save({"single": single, "parallel": parallel}, os.path.join(args.out, "demo_latents.pt"))
    print(f"wrote {png} (latent preview of the parallel result)")
    return 0 if rel_err <= 1e-4 and ranks_agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
