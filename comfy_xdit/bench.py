"""End-to-end benchmark through the real worker pool (the path the Sampler node uses).

    python -m comfy_xdit.bench --px 1024,2048 --gpus 1,2 --strategies ulysses,ring [--compile both]
                               [--baseline] [--steps 28] [--preset flux-dev] [--json out.json]
                               [--weight-dtype fp8_e4m3fn] [--memory-cap-gb 16 [--resident-gb 4.9]]
    python -m comfy_xdit.bench --vae --px 2048,4096,8192 --gpus 1,2
    python -m comfy_xdit.bench --preset wan2.1-t2v-14b --px 832x480 --frames 81 --cfg 5 --steps 40 --gpus 1,2
    python -m comfy_xdit.bench --preset qwen-image --px 1328 --cfg 4 --steps 50 --text-tokens 128 --gpus 1,2
    python -m comfy_xdit.bench --preset pixart-sigma-xl-2-2048 --px 2048 --cfg 4.5 --steps 20 --text-tokens 120

Full-size random-weight models (shapes, not values, decide speed). For every GPU count,
strategy, resolution and compile setting: one warm-up request, then one timed request of
`steps` steps. Prints one table: seconds end to end, the workers' own denoise time, pool
overhead (end to end minus denoise), speedup over a 1-GPU run of the family's diffusers pipeline
(FluxPipeline, StableDiffusion3Pipeline, WanPipeline, QwenImagePipeline, PixArtAlphaPipeline / PixArtSigmaPipeline;
latent out, no text encoder or VAE)
in the same call (--baseline), TFLOP/s per GPU from the shapes, and peak memory per GPU. A sampling request
that runs out of memory is reported as a row too (refused, or failed where a worker died).

--memory-cap-gb caps what each worker may allocate (emulating smaller cards on a large one);
--resident-gb makes this process hold that much on GPU 0 for the whole run, the way ComfyUI
keeps a text encoder there, and lowers rank 0's cap by as much. A layout that does not fit is
reported as refused, with the pool's message. --vae times the patch-parallel VAE decode of a
full-size Flux VAE (random weights, written to a temporary file) instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

from .models.family import all_presets, family_for_preset
from .pool.controller import PoolDied, PoolOptions, RequestFailed, WorkerPool
from .pool.protocol import MEMORY_CAP_ENV

STRATEGIES = {"ulysses": lambda n: {"ulysses_degree": n}, "ring": lambda n: {"ring_degree": n},
              "hybrid": lambda n: {"ulysses_degree": 2, "ring_degree": n // 2}, "auto": lambda n: None,
              "pipefusion": lambda n: {"pipefusion_degree": n}, "cfg_parallel": lambda n: {"cfg_degree": n},
              "pipefusion_ulysses": lambda n: {"pipefusion_degree": 2, "ulysses_degree": n // 2}}


def flops_per_step(config: dict, image_tokens: int, text_tokens: int) -> float:
    """Matmul + attention FLOPs of one forward (batch 1), counted from the shapes: MM-DiTs (Flux: double + single
    blocks; SD3: joint blocks, plus SD3.5 Medium's image-only attn2; Qwen-Image: 60 dual-stream blocks, each one
    of Flux's double blocks: q, k, v, o and a 4x GELU MLP per stream, every token through its own stream's
    weights, and joint attention over text + image), Wan (self-attention, cross-attention to the text, FFN per
    block) and PixArt (the same three per block: self-attention over the image tokens, cross-attention to the T5
    text, a 4x GELU-tanh MLP). Per-sample work (modulation linears on the timestep embedding, the embedders,
    PixArt's caption projection) is not counted."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    if "caption_channels" in config:  # PixArt: every block is self-attention, cross-attention, MLP d -> 4d -> d
        s, t = image_tokens, text_tokens
        block = (2 * s * d * 4 * d + 4 * s * s * d            # self-attention: q, k, v, o; QK^T and PV
                 + 2 * s * d * 2 * d + 2 * t * d * 2 * d + 4 * s * t * d  # cross: q, o; k, v of the text
                 + 2 * s * d * 4 * d * 2)                      # MLP
        return config["num_layers"] * block
    if "ffn_dim" in config:  # Wan
        s, t = image_tokens, text_tokens
        block = (2 * s * d * 4 * d + 4 * s * s * d            # self-attention: q, k, v, o; QK^T and PV
                 + 2 * s * d * 2 * d + 2 * t * d * 2 * d + 4 * s * t * d  # cross: q, o; k, v of the text
                 + 2 * s * d * config["ffn_dim"] * 2)
        return config["num_layers"] * block
    s, mlp = image_tokens + text_tokens, 4
    # a double / dual-stream block: q, k, v, o (8 s d^2), MLP d -> 4d -> d (16 s d^2), QK^T and PV (4 s^2 d)
    double = 2 * s * d * 4 * d + 2 * s * d * 2 * mlp * d + 4 * s * s * d
    single = 2 * s * d * (3 * d + mlp * d) + 2 * s * (d + mlp * d) * d + 4 * s * s * d
    attn2 = 2 * image_tokens * d * 4 * d + 4 * image_tokens * image_tokens * d
    return (config["num_layers"] * double + config.get("num_single_layers", 0) * single
            + len(config.get("dual_attention_layers") or ()) * attn2)


def parse_size(text: str) -> tuple[int, int]:
    """'1024' -> (1024, 1024); '832x480' -> (832, 480) (width x height, px)."""
    w, _, h = text.partition("x")
    return int(w), int(h or w)


def latent_shape(family, config: dict, size: tuple[int, int], frames: int) -> tuple:
    """The latent a job of this size takes: [1, C, h, w], or for video [1, C, 1 + (frames - 1) // 4, h, w]."""
    w, h = size
    fmt = family.latent_format_for(config)
    if family.video:
        down = 16 if fmt.channels == 48 else 8  # the Wan 2.2 VAE compresses 16x, the Wan 2.1 VAE 8x
        return (1, fmt.channels, 1 + (max(frames, 1) - 1) // 4, h // down, w // down)
    return (1, fmt.channels, h // 8, w // 8)


def size_label(size: tuple[int, int], frames: int) -> str:
    return f"{size[0]}x{size[1]}" + (f"x{frames}f" if frames else "")


# Qwen/Qwen-Image's scheduler/scheduler_config.json (what QwenImagePipeline.from_pretrained builds)
QWEN_IMAGE_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                            max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                            stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                            use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)


# PixArt-alpha/PixArt-Sigma-XL-2-*-MS's scheduler (diffusers' scripts/convert_pixart_sigma_to_diffusers.py saves a
# default DPMSolverMultistepScheduler: DPM-Solver++ 2M on the linear 0.0001..0.02 betas, eps prediction), spelled
# out so that a change of diffusers' defaults cannot change the baseline. One model call a step, as the pool's
# euler / simple (the bench's sampler there): the two differ only in the per-step update, a few latent-sized ops.
PIXART_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        solver_order=2, prediction_type="epsilon", algorithm_type="dpmsolver++",
                        solver_type="midpoint", lower_order_final=True, timestep_spacing="linspace", steps_offset=0)


def text_width(config: dict) -> int:
    """The width of the text states the transformer takes (what its text encoder gives)."""
    for key in ("joint_attention_dim", "caption_channels", "text_dim"):  # MM-DiTs, PixArt (T5-XXL), Wan
        if config.get(key):
            return config[key]
    raise KeyError(f"no text width in the config ({sorted(config)})")


def diffusers_pipeline(family, config: dict, px, text_tokens: int, cfg: float = 1.0, frames: int = 0,
                       device="cuda"):
    """The family's plain diffusers pipeline around a random-weight transformer (bf16 on CUDA, fp32 on CPU) with
    random text embeddings in place of the text encoders, and no VAE -> run(steps), a latent-out denoise of
    `steps` steps (cfg > 1: with a negative prompt); run.pipe is the pipeline. px: a side or (width, height)."""
    from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           PixArtAlphaPipeline, PixArtSigmaPipeline, QwenImagePipeline, StableDiffusion3Pipeline,
                           WanPipeline)

    width, height = (px, px) if isinstance(px, int) else px
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    transformer = family.random(config, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    if family.name == "wan":
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=8.0))
        embeds = torch.randn(1, text_tokens, config["text_dim"], device=device, dtype=dtype)

        def run(n):
            pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=height, width=width, num_frames=frames,
                 num_inference_steps=n, guidance_scale=cfg, output_type="latent")
            sync()
        run.pipe = pipe
        return run
    if family.name == "qwen":
        # QwenImagePipeline.__call__ with the Qwen2.5-VL output given: prompt_embeds [1, T, 3584] and its mask (all
        # ones: encode_prompt drops a full mask, as ComfyUI passes none); true cfg (two batch-1 forwards a step)
        # when true_cfg_scale > 1 and negative embeddings are given. No VAE: vae_scale_factor falls back to 8.
        pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=None,
                                 text_encoder=None, tokenizer=None, transformer=transformer)
        embeds = torch.randn(1, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype)
        mask = torch.ones(1, text_tokens, dtype=torch.long, device=device)
        negative = dict(negative_prompt_embeds=embeds, negative_prompt_embeds_mask=mask) if cfg > 1 else {}

        def run(n):
            pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=cfg, height=height, width=width,
                 num_inference_steps=n, max_sequence_length=text_tokens, output_type="latent", **negative)
            sync()
        run.pipe = pipe
        return run
    if family.name == "pixart":
        # PixArtSigmaPipeline (PixArtAlphaPipeline for a model with α's micro-conditions, which it then feeds the
        # image size and aspect ratio, as ComfyUI's defaults do) with the T5 output given: prompt_embeds [1, T, 4096]
        # and a mask of ones (required with embeddings; an all-zero bias on the cross-attention), the negative alike;
        # cfg > 1: one batch-2 forward a step (cond and uncond batched, as the pool does on 1 GPU). No resolution
        # binning: it would move the size to the nearest of the release's aspect-ratio bins. No VAE: vae_scale_factor
        # falls back to 8.
        cls = PixArtAlphaPipeline if config.get("use_additional_conditions") else PixArtSigmaPipeline
        pipe = cls(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                   scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER))
        embeds = torch.randn(1, text_tokens, text_width(config), device=device, dtype=dtype)
        mask = torch.ones(1, text_tokens, dtype=torch.long, device=device)

        def run(n):
            pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=embeds,
                 negative_prompt_attention_mask=mask, negative_prompt=None, guidance_scale=cfg, height=height,
                 width=width, num_inference_steps=n, use_resolution_binning=False,
                 max_sequence_length=text_tokens, output_type="latent")
            sync()
        run.pipe = pipe
        return run
    embeds = torch.randn(1, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype)
    pooled = torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype)
    if family.name == "sd3":
        pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                        text_encoder_3=None, tokenizer_3=None, transformer=transformer)
        pipe.vae_scale_factor = 8  # no VAE attached: SD3's VAE downsamples by 8
        extra = dict(negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled, guidance_scale=cfg)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                    max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
        pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=transformer)
        extra = dict(max_sequence_length=text_tokens)

    def run(n):
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=height, width=width, num_inference_steps=n,
             output_type="latent", **extra)
        sync()
    run.pipe = pipe
    return run


def baseline_diffusers(family, config: dict, px, steps: int, text_tokens: int, cfg: float = 1.0,
                       frames: int = 0, device="cuda", warmup_steps: int = 2) -> float:
    """Seconds of a `steps`-step denoise in the family's plain diffusers pipeline on one device, after a warm-up
    of warmup_steps steps: the reference the speedups divide. px: a side or (width, height)."""
    run = diffusers_pipeline(family, config, px, text_tokens, cfg, frames, device)
    if warmup_steps:
        run(warmup_steps)
    start = time.perf_counter()
    run(steps)
    return time.perf_counter() - start


def _progress(label: str):
    def show(args, _preview):
        if args["step"] == args["total"] or args["step"] % 7 == 0:
            print(f"  {label}: step {args['step']}/{args['total']} ({args['elapsed']:.1f} s)", file=sys.stderr,
                  flush=True)
    return show


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flux-dev", choices=sorted(all_presets()))
    p.add_argument("--cfg", type=float, default=1.0, help="cfg > 1 runs a negative prompt (SD3, PixArt: 4.5)")
    p.add_argument("--px", default="1024", help="sizes, comma-separated: 1024 (square) or 832x480 (width x height)")
    p.add_argument("--frames", type=int, default=0, help="video families: pixel frames (Wan: 81)")
    p.add_argument("--gpus", default="1,2")
    p.add_argument("--strategies", default="ulysses,ring")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--text-tokens", type=int, default=512, help="text states per prompt (PixArt: 120 to 300)")
    p.add_argument("--kernel", default=None, help="attention kernel: cudnn, flash, efficient (default: cudnn)")
    p.add_argument("--compile", default="off", choices=["off", "on", "both"])
    p.add_argument("--pipeline-patches", type=int, default=2, help="pipefusion: row patches per step")
    p.add_argument("--warmup-steps", type=int, default=1, help="pipefusion: synchronous steps first")
    p.add_argument("--baseline", action="store_true",
                   help="also time the family's diffusers pipeline (FluxPipeline, StableDiffusion3Pipeline, "
                        "WanPipeline, QwenImagePipeline, PixArtSigmaPipeline / PixArtAlphaPipeline) on 1 GPU "
                        "(--device cpu: on the CPU, fp32)")
    p.add_argument("--baseline-from", default=None, metavar="JSON",
                   help="speedups over the diffusers times in an earlier run's --json (same preset, steps, cfg, "
                        "text tokens), e.g. a 1-GPU run with --baseline before a 2-GPU one")
    p.add_argument("--json", default=None, help="write the rows here too")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run on CPU ranks")
    p.add_argument("--weight-dtype", default=None, help="bf16 (default on CUDA), fp8_e4m3fn, fp16, fp32")
    p.add_argument("--memory-cap-gb", type=float, default=None, help="GB each worker may allocate")
    p.add_argument("--resident-gb", type=float, default=0.0, help="GB this process holds on GPU 0 meanwhile")
    p.add_argument("--vae", action="store_true", help="time the patch-parallel VAE decode instead")
    p.add_argument("--vae-kind", default="flux", choices=["flux", "wan21"],
                   help="--vae: the Flux VAE (images) or the Wan 2.1 VAE (video: --frames)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU is visible (use --device cpu with --preset tiny for a smoke run)")
    resolutions = [parse_size(x) for x in args.px.split(",")]
    args.weight_dtype = args.weight_dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.vae:
        return bench_vae(args, resolutions)
    family = family_for_preset(args.preset)
    config = family.preset_config(args.preset)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    baselines = {px: baseline_diffusers(family, config, px, args.steps, args.text_tokens, args.cfg, args.frames,
                                        device=args.device)
                 for px in resolutions} if args.baseline else {}
    if args.baseline_from and not args.baseline:
        baselines = _earlier_baselines(p, args, resolutions)
    elif baselines and args.device == "cuda":
        gc.collect()  # the baseline's pipeline and model are gone: hand their memory back before the pools start
        torch.cuda.empty_cache()
    for px, seconds in baselines.items():
        print(f"diffusers, 1 GPU, {size_label(px, args.frames)}: {seconds:.3f} s"
              + (f" (from {args.baseline_from})" if not args.baseline else ""), file=sys.stderr, flush=True)

    resident = (torch.empty(int(args.resident_gb * 1e9), dtype=torch.uint8, device="cuda")
                if args.resident_gb else None)  # stays allocated until this process ends
    rows = []
    for gpus in [int(x) for x in args.gpus.split(",")]:
        pool = WorkerPool(_pool_options(args, gpus))
        try:
            for strategy in (args.strategies.split(",") if gpus > 1 else ["single"]):
                for compiled in compiles:
                    dtype = args.weight_dtype
                    load = dict(random_preset=args.preset, dtype=dtype, attention_kernel=args.kernel,
                                parallel=STRATEGIES.get(strategy, lambda n: None)(gpus), compile=compiled,
                                num_pipeline_patch=args.pipeline_patches, warmup_steps=args.warmup_steps)
                    try:
                        loaded = pool.request("load_model", load)[0]
                        key = loaded["model_key"]
                    except RequestFailed as e:
                        if e.kind != "memory":
                            raise
                        row = dict(gpus=gpus, strategy=strategy, dtype=dtype, compile=compiled, refused=str(e))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        continue
                    for px in resolutions:
                        g = torch.Generator().manual_seed(0)
                        shape = latent_shape(family, config, px, args.frames)
                        width = text_width(config)
                        tensors = {"positive.context": torch.randn(1, args.text_tokens, width, generator=g).bfloat16(),
                                   "latent": torch.zeros(shape)}
                        if "pooled_projection_dim" in config:
                            tensors["positive.pooled"] = torch.randn(1, config["pooled_projection_dim"],
                                                                     generator=g).bfloat16()
                        if args.cfg != 1.0:
                            tensors.update({"negative." + k.split(".")[1]: v for k, v in tensors.items()
                                            if k.startswith("positive.")})
                        label = f"{gpus} GPU {strategy} {size_label(px, args.frames)} compile={compiled}"
                        rows_, cols_ = family.token_grid(shape)
                        warm = dict(model_key=key, seed=0, steps=3 if compiled else 2, cfg=args.cfg)
                        try:
                            pool.request("sample", warm, tensors)
                            start = time.perf_counter()
                            reply, _ = pool.request("sample", dict(model_key=key, seed=0, steps=args.steps,
                                                                   cfg=args.cfg), tensors, on_progress=_progress(label))
                            total = time.perf_counter() - start
                        except (RequestFailed, PoolDied) as e:
                            if isinstance(e, RequestFailed) and e.kind != "memory":
                                raise
                            # the layout was let through but sampling ran out of memory (a refusal), or a worker
                            # died (a CUDA out-of-memory error kills it): recorded, and this pool is done
                            died = isinstance(e, PoolDied)
                            row = dict(gpus=gpus, strategy=strategy, dtype=loaded.get("weight_dtype", dtype),
                                       layout={k: v for k, v in loaded["parallel"].items() if v > 1},
                                       px=size_label(px, args.frames), compile=compiled,
                                       **{"failed" if died else "refused": str(e).strip()[-2000:]})
                            rows.append(row)
                            print(json.dumps(row), flush=True)
                            if died:
                                raise _PoolLost from e
                            continue
                        branches = 2 if args.cfg != 1.0 else 1
                        flops = flops_per_step(config, rows_ * cols_, args.text_tokens) * args.steps * branches
                        row = dict(gpus=gpus, strategy=strategy, dtype=loaded.get("weight_dtype", dtype),
                                   layout={k: v for k, v in loaded["parallel"].items() if v > 1},
                                   px=size_label(px, args.frames),
                                   compile=compiled, steps=args.steps,
                                   seconds=round(total, 3), denoise_s=round(reply["elapsed"], 3),
                                   overhead_ms=round((total - reply["elapsed"]) * 1e3, 1),
                                   tflops_per_gpu=round(flops / total / gpus / 1e12, 1),
                                   peak_gib=[round(m / 2**30, 1) for m in reply.get("peak_memory", [])])
                        if px in baselines:
                            row["speedup_vs_diffusers"] = round(baselines[px] / total, 2)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                    pool.request("unload_model", {"model_key": key})
        except _PoolLost:
            pass  # its rows say why; the next GPU count starts a new pool
        finally:
            pool.shutdown()

    print(f"\n{'GPUs':>4} {'strategy':>8} {'px':>12} {'compile':>7} {'seconds':>8} {'denoise':>8} {'ovh ms':>7} "
          f"{'speedup':>7} {'TFLOP/s/GPU':>11}  peak GiB/GPU  weights, layout")
    for px, seconds in baselines.items():
        rows_, cols_ = family.token_grid(latent_shape(family, config, px, args.frames))
        flops = flops_per_step(config, rows_ * cols_, args.text_tokens) * args.steps * (2 if args.cfg != 1.0 else 1)
        print(f"{1:>4} {'diffusers':>8} {size_label(px, args.frames):>12} {'-':>7} {seconds:>8.3f} {'-':>8} {'-':>7} "
              f"{1.0:>7.2f} {flops / seconds / 1e12:>11.1f}")
    for r in rows:
        if "refused" in r or "failed" in r:
            what = "refused" if "refused" in r else "failed"
            print(f"{r['gpus']:>4} {r['strategy']:>8} {r.get('px', '')} {r['dtype']} {r.get('layout', '')}: {what}: "
                  f"{r[what]}")
            continue
        print(f"{r['gpus']:>4} {r['strategy']:>8} {r['px']:>12} {str(r['compile']):>7} {r['seconds']:>8.3f} "
              f"{r['denoise_s']:>8.3f} {r['overhead_ms']:>7.1f} {r.get('speedup_vs_diffusers', float('nan')):>7.2f} "
              f"{r['tflops_per_gpu']:>11.1f}  {r['peak_gib']}  {r['dtype']} {r['layout']}")
    if args.json:
        with open(args.json, "w") as f:
            times = {size_label(px, args.frames): v for px, v in baselines.items()}
            json.dump(dict(run=_run_key(args), baselines=times, rows=rows), f, indent=1)
    del resident
    return 1 if any("failed" in r for r in rows) else 0


def _run_key(args) -> dict:
    """What a diffusers time depends on, kept in --json so that --baseline-from can check it."""
    return dict(preset=args.preset, steps=args.steps, cfg=args.cfg, text_tokens=args.text_tokens, frames=args.frames)


def _earlier_baselines(parser, args, resolutions) -> dict:
    with open(args.baseline_from) as f:
        earlier = json.load(f)
    if earlier.get("run") != _run_key(args):
        parser.error(f"--baseline-from {args.baseline_from}: it ran {earlier.get('run')}, this runs {_run_key(args)}")
    times = earlier.get("baselines", {})
    return {px: times[size_label(px, args.frames)] for px in resolutions if size_label(px, args.frames) in times}


class _PoolLost(Exception):
    """A worker died during a request: the rest of this pool's runs are skipped."""


def _pool_options(args, gpus: int) -> PoolOptions:
    env = {}
    if args.memory_cap_gb:
        caps = [args.memory_cap_gb - (args.resident_gb if rank == 0 else 0.0) for rank in range(gpus)]
        env[MEMORY_CAP_ENV] = ",".join(f"{c:.3f}" for c in caps)
    return PoolOptions(nproc=gpus, device=args.device, start_timeout=600, env=env)


FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def bench_vae(args, resolutions: list[tuple[int, int]]) -> int:
    """Decode time and peak memory per GPU of a full-size Flux VAE (or Wan 2.1 VAE, video) through the pool, per
    GPU count and size."""
    import tempfile

    from diffusers import AutoencoderKL, AutoencoderKLWan

    from .vae.loader import write_vae_checkpoint
    from .vae.wan import write_wan_vae_checkpoint

    dtype = args.weight_dtype
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.vae_kind == "wan21":
            path = write_wan_vae_checkpoint(AutoencoderKLWan().eval(), f"{tmp}/wan_2.1_vae.safetensors")
        else:
            path = write_vae_checkpoint(AutoencoderKL(**FLUX_VAE).eval(), f"{tmp}/ae.safetensors")
        for gpus in [int(x) for x in args.gpus.split(",")]:
            pool = WorkerPool(_pool_options(args, gpus))
            try:
                key = pool.request("load_model", dict(kind="vae", path=path, dtype=dtype))[0]["model_key"]
                for size in resolutions:
                    w, h = size
                    frames = 1 + (max(args.frames, 1) - 1) // 4
                    shape = (1, 16, frames, h // 8, w // 8) if args.vae_kind == "wan21" else (1, 16, h // 8, w // 8)
                    latent = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
                    px = size_label(size, args.frames if args.vae_kind == "wan21" else 0) if w != h else w
                    row = dict(gpus=gpus, px=px, dtype=dtype)
                    try:
                        pool.request("decode", {"vae_key": key}, {"samples": latent[..., :64, :64]})  # warm-up
                        start = time.perf_counter()
                        reply, _ = pool.request("decode", {"vae_key": key}, {"samples": latent})
                        row.update(seconds=round(time.perf_counter() - start, 3),
                                   decode_s=round(reply["elapsed"], 3),
                                   peak_gib=[round(m / 2**30, 2) for m in reply.get("peak_memory", [])])
                    except RequestFailed as e:
                        if e.kind != "memory":
                            raise
                        row["refused"] = str(e)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                pool.shutdown()
    print(f"\n{'GPUs':>4} {'px':>12} {'seconds':>8} {'decode':>8}  peak GiB/GPU")
    for r in rows:
        if "refused" in r:
            print(f"{r['gpus']:>4} {r['px']:>12} refused: {r['refused']}")
        else:
            print(f"{r['gpus']:>4} {r['px']:>12} {r['seconds']:>8.3f} {r['decode_s']:>8.3f}  {r['peak_gib']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
