"""CUDA check of the USP engine: kernels, parallel-vs-single-GPU correctness, first timings.

Run from the repository root (the repository root on PYTHONPATH):

    python3 tests/gpu/check_usp_cuda.py [--parts env,probe,correctness,timing] [--cpu]

Parts:
- env: versions and devices.
- probe: each ring-step kernel (cudnn, flash, efficient) on one GPU against a float64
  reference: output error, the shape and value of its log-sum-exp, and a short timing.
- correctness: a medium random Flux (head size 128) written as a checkpoint, loaded on
  2 ranks under Ulysses 2 and Ring 2 with every kernel and dtype, compared with the same
  checkpoint on one GPU: one denoiser call and an 8-step sample, text 512 (split) and 77
  (replicated). Errors are reported, not asserted.
- timing: full-size FLUX.1-dev shapes with random bf16 weights (built in memory, never
  written): per-step forward time on 1 GPU (default SDPA processor) and on 2 GPUs
  (Ulysses 2, Ring 2; cuDNN kernel), a 28-step sample, and peak memory per GPU.

Every result is one JSON object per line on stdout, and appended to $OUT/usp_cuda.jsonl
when OUT is set. --cpu (automatic without CUDA) runs the same code on gloo with tiny
sizes, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# NVLink multicast stays off in every process (spawned ranks inherit the environment).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from comfy_xdit.attention import kernels as kernel_mod  # noqa: E402
from comfy_xdit.attention.kernels import get_kernel  # noqa: E402
from comfy_xdit.config import ParallelConfig  # noqa: E402
from comfy_xdit.mesh import build_mesh  # noqa: E402
from comfy_xdit.models.flux import FluxModel, flux_conditioning  # noqa: E402
from comfy_xdit.models.flux.checkpoint import load_flux_transformer, write_flux_checkpoint  # noqa: E402
from comfy_xdit.models.flux.random import flux_config, random_flux  # noqa: E402
from comfy_xdit.sampling import sample  # noqa: E402
from comfy_xdit.spmd import run_spmd  # noqa: E402

# Spawned ranks inherit the parent's start time, so every record's "t" counts from one origin.
T_START = float(os.environ.setdefault("USP_CHECK_T0", str(time.time())))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = {"ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2)}


# ----------------------------------------------------------------------------- output

def emit(part: str, **record) -> None:
    record = {"part": part, **record, "t": round(time.time() - T_START, 1)}
    line = json.dumps(record, default=str)
    sys.stdout.write(line + "\n")  # one write per record: ranks share stdout
    sys.stdout.flush()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "usp_cuda.jsonl"), "a") as f:
            f.write(line + "\n")


def _err_text(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()] or [""]
    text = lines[0][:300] + (f" ... {lines[-1][:300]}" if len(lines) > 1 else "")
    return f"{type(e).__name__}: {text}"


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- settings

def settings(cpu: bool) -> dict:
    if cpu:
        return dict(
            cpu=True, backend="gloo", kernels=("cpu",), dtypes=("float32", "bfloat16"),
            medium=flux_config("tiny"), medium_std=0.05,
            check_latent=(12, 10),  # 6 x 5 = 30 image tokens
            text_lens=(512, 77), check_steps=8,
            probe_shapes=[(37, 37), (30, 107)], probe_heads=4, probe_head_dim=32,
            bench_seqs=(), timing_preset="tiny",
            resolutions={"64px": (8, 8), "128px": (16, 16)}, sample_res="64px",
            timing_text=512, sample_steps=28, warmup=2, iters=5,
            extra_kernels=(),
        )
    return dict(
        cpu=False, backend="nccl", kernels=("cudnn", "flash", "efficient"), dtypes=("float32", "bfloat16"),
        medium=flux_config("tiny", num_layers=2, num_single_layers=2, attention_head_dim=128,
                           num_attention_heads=8, joint_attention_dim=256, pooled_projection_dim=64),
        # At width 1024 random_flux's default std 0.05 makes the model so ill-conditioned that bf16 and
        # fp32 single-GPU outputs differ by ~0.6 (relative); 0.02 brings that to ~0.04.
        medium_std=0.02,
        # 30 x 22 = 660 image tokens, 330 a rank: local sequences are not multiples of 32
        check_latent=(60, 44),
        text_lens=(512, 77), check_steps=8,
        probe_shapes=[(845, 845), (586, 1172), (1024, 1024), (77, 4096)], probe_heads=4, probe_head_dim=128,
        bench_seqs=(4608, 16896), timing_preset="flux-dev",
        resolutions={"1024px": (128, 128), "2048px": (256, 256)}, sample_res="1024px",
        timing_text=512, sample_steps=28, warmup=2, iters=5,
        extra_kernels=("flash", "efficient"),  # Ulysses 2 at the sample resolution, beside cuDNN
    )


def _device(rank: int, cpu: bool) -> torch.device:
    if cpu:
        return torch.device("cpu")
    torch.cuda.set_device(rank)  # before any collective: NCCL binds its communicators to this device
    return torch.device("cuda", rank)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(device: torch.device) -> None:
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    _sync(device)


def _gib(n: int) -> float:
    return round(n / 2**30, 2)


def _peak(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return dict(peak_alloc_gib=_gib(torch.cuda.max_memory_allocated(device)),
                peak_reserved_gib=_gib(torch.cuda.max_memory_reserved(device)))


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- env

def part_env(S: dict) -> None:
    import diffusers
    import yunchang
    info = dict(python=sys.version.split()[0], torch=torch.__version__, diffusers=diffusers.__version__,
                yunchang=getattr(yunchang, "__version__", "?"), cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(), mode="cpu" if S["cpu"] else "cuda",
                env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                     "NVSHMEM_DISABLE_NVLS")})
    if not S["cpu"]:
        n = torch.cuda.device_count()
        info.update(gpus=[torch.cuda.get_device_name(i) for i in range(n)],
                    gpu_mem_gib=[_gib(torch.cuda.get_device_properties(i).total_memory) for i in range(n)],
                    cudnn=torch.backends.cudnn.version(), nccl=str(torch.cuda.nccl.version()),
                    peer_access=[torch.cuda.can_device_access_peer(i, j) for i in range(n) for j in range(n) if i != j],
                    allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    emit("env", **info)


# ----------------------------------------------------------------------------- probe

def _attention_ref(q, k, v, scale):
    """float64 attention on [b, s, h, d]: (out [b, s, h, d], lse [b, h, s])."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)
    return out, lse


def _probe_one(name: str, dtype: torch.dtype, device: torch.device, sq: int, sk: int, heads: int, head_dim: int,
               seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, s, heads, head_dim, generator=g) * a for s, a in ((sq, 2.0), (sk, 2.0), (sk, 1.0)))
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    scale = head_dim ** -0.5
    out_ref, lse_ref = _attention_ref(q, k, v, scale)
    rec = dict(kernel=name, dtype=str(dtype).split(".")[-1], sq=sq, sk=sk)
    try:
        raw = kernel_mod._IMPLS[name](*(t.transpose(1, 2) for t in (q, k, v)), scale, True)
        rec.update(raw_lse_shape=list(raw[1].shape), raw_lse_dtype=str(raw[1].dtype).split(".")[-1])
        out, lse = get_kernel(name)(q, k, v, softmax_scale=scale)
        _sync(device)
        rec.update(out_shape_ok=list(out.shape) == list(q.shape), out_dtype=str(out.dtype).split(".")[-1],
                   lse_shape=list(lse.shape), lse_shape_ok=list(lse.shape) == [1, heads, sq],
                   out_finite=bool(torch.isfinite(out).all()))
        rec["out_rel_err"] = _rel_err(out, out_ref)
        lse_c = lse[..., :sq].double()
        rec["lse_max_abs_err"] = float((lse_c - lse_ref).abs().max())
        rec["lse_max_abs_err_if_log2"] = float((lse_c * math.log(2) - lse_ref).abs().max())
    except Exception as e:  # unsupported dtype etc.: record and go on
        rec["error"] = _err_text(e)
    return rec


def _bench_kernel(fn, *args, warmup=3, iters=10) -> float:
    for _ in range(warmup):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def part_probe(S: dict) -> None:
    device = torch.device("cpu") if S["cpu"] else _device(0, False)
    for name in S["kernels"]:
        for dt in S["dtypes"]:
            for i, (sq, sk) in enumerate(S["probe_shapes"]):
                emit("probe", **_probe_one(name, DTYPES[dt], device, sq, sk, S["probe_heads"],
                                           S["probe_head_dim"], seed=100 + i))
    # Kernel speed at Flux's joint sequence lengths (24 heads of 128, bf16): our ring-step kernels and plain SDPA.
    for seq in S["bench_seqs"]:
        g = torch.Generator().manual_seed(seq)
        q, k, v = (torch.randn(1, seq, 24, 128, generator=g).to(device, torch.bfloat16) for _ in range(3))
        flops = 4 * seq * seq * 24 * 128
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        cands = {n: (lambda n=n: get_kernel(n)(q, k, v, softmax_scale=128 ** -0.5)) for n in S["kernels"]}
        cands["sdpa_default"] = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
        for n, fn in cands.items():
            try:
                ms = _bench_kernel(fn)
                emit("probe_bench", kernel=n, seq=seq, heads=24, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
            except Exception as e:
                emit("probe_bench", kernel=n, seq=seq, error=_err_text(e))
        del q, k, v, qt, kt, vt
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- correctness

def _inputs(seed: int, text_len: int, config: dict, latent_hw) -> dict:
    g = torch.Generator().manual_seed(seed + text_len)
    h, w = latent_hw
    return dict(latent=torch.randn(1, 16, h, w, generator=g),
                context=torch.randn(1, text_len, config["joint_attention_dim"], generator=g),
                pooled=torch.randn(1, config["pooled_projection_dim"], generator=g),
                sigma=float(torch.rand((), generator=g)) * 0.9 + 0.05,
                noise_seed=int(torch.randint(0, 2**31, (), generator=g)))


def _forward(model: FluxModel, inp: dict) -> torch.Tensor:
    denoise = model.denoiser(flux_conditioning(inp["context"], inp["pooled"], 3.5), tuple(inp["latent"].shape))
    return denoise(inp["latent"], inp["sigma"])


def _sample(model: FluxModel, inp: dict, steps: int) -> torch.Tensor:
    return sample(model, flux_conditioning(inp["context"], inp["pooled"], 3.5), torch.zeros_like(inp["latent"]),
                  seed=inp["noise_seed"], steps=steps)


def _lse_sliced(kernel):
    """The kernel with its LSE cut to the query length (efficient attention pads it to a multiple of 32)."""
    def fixed(q, k, v, softmax_scale=None, **kw):
        out, lse = kernel(q, k, v, softmax_scale=softmax_scale, **kw)
        return out, lse[..., :q.shape[1]]
    return fixed


def _local_kernel_check(name: str, dtype: torch.dtype, device: torch.device) -> dict:
    """One small single-device call, so unsupported combinations are skipped before any collective."""
    return _probe_one(name, dtype, device, 45, 90, 2, 128 if device.type == "cuda" else 32, seed=7)


def _correctness_rank(rank: int, world_size: int, S: dict, path: str, inputs: dict, refs: dict) -> list:
    device = _device(rank, S["cpu"])
    rows = []

    def report(**rec):
        rows.append(rec)
        if rank == 0:
            emit("correctness", **rec)

    for layout_name, layout in LAYOUTS.items():
        mesh = build_mesh(ParallelConfig(**layout), device)
        for dt in S["dtypes"]:
            dtype = DTYPES[dt]
            for kname in S["kernels"]:
                check = _local_kernel_check(kname, dtype, device)
                if "error" in check or not check["out_finite"]:
                    report(layout=layout_name, kernel=kname, dtype=dt, supported=False,
                           error=check.get("error", "non-finite output from a single-device call"))
                    continue
                variants = [(kname, None)]
                if not check["lse_shape_ok"]:
                    variants.append((kname + "+lse_slice", _lse_sliced))
                for vname, patch in variants:
                    try:
                        model = FluxModel.load(path, dtype=dtype, mesh=mesh, attention_kernel=kname)
                    except Exception as e:
                        report(layout=layout_name, kernel=vname, dtype=dt, stage="load", error=_err_text(e))
                        continue
                    if patch is not None:
                        model._shard.attention.kernel = patch(model._shard.attention.kernel)
                    for text_len in S["text_lens"]:
                        inp = inputs[text_len]
                        for kind in ("forward", "sample"):
                            rec = dict(layout=layout_name, kernel=vname, dtype=dt, text_len=text_len, kind=kind,
                                       text="split" if text_len % mesh.sp_degree == 0 else "replicated")
                            try:
                                t0 = time.perf_counter()
                                out = _forward(model, inp) if kind == "forward" else _sample(model, inp,
                                                                                              S["check_steps"])
                                rec["s"] = round(time.perf_counter() - t0, 3)
                                rec["finite"] = bool(torch.isfinite(out).all())
                                rec["rel_err"] = _rel_err(out, refs[(dt, kind, text_len)])
                                if dt != "float32":
                                    rec["rel_err_vs_fp32_ref"] = _rel_err(out, refs[("float32", kind, text_len)])
                            except Exception as e:
                                rec["error"] = _err_text(e)
                                if rank == 0:
                                    rec["trace"] = traceback.format_exc().strip().splitlines()[-6:]
                            report(**rec)
                    del model
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


def part_correctness(S: dict, world_size: int) -> None:
    cfg = S["medium"]
    device0 = torch.device("cpu") if S["cpu"] else torch.device("cuda", 0)
    tmp = tempfile.mkdtemp(prefix="usp-check-")
    path = os.path.join(tmp, "flux_medium.safetensors")
    write_flux_checkpoint(random_flux(cfg, seed=3, std=S["medium_std"]), path, layout="bfl")
    emit("correctness_setup", config={k: v for k, v in cfg.items() if k != "axes_dims_rope"}, std=S["medium_std"],
         latent=list(S["check_latent"]), image_tokens=(S["check_latent"][0] // 2) * (S["check_latent"][1] // 2),
         checkpoint_mib=round(os.path.getsize(path) / 2**20, 1))
    inputs = {t: _inputs(1234, t, cfg, S["check_latent"]) for t in S["text_lens"]}
    refs = {}
    for dt in S["dtypes"]:
        transformer, info = load_flux_transformer(path, dtype=DTYPES[dt], device=device0)
        model = FluxModel(transformer, None, info=info)
        for t, inp in inputs.items():
            refs[(dt, "forward", t)] = _forward(model, inp).cpu()
            refs[(dt, "sample", t)] = _sample(model, inp, S["check_steps"]).cpu()
        del model, transformer
    for (dt, kind, t), x in refs.items():
        rec = dict(dtype=dt, kind=kind, text_len=t, finite=bool(torch.isfinite(x).all()), std=float(x.std()))
        if dt != "float32":
            rec["rel_err_vs_fp32_ref"] = _rel_err(x, refs[("float32", kind, t)])
        emit("reference_1gpu", **rec)
    if device0.type == "cuda":
        torch.cuda.empty_cache()
    if world_size < 2:
        emit("correctness", skipped="needs 2 devices")
        return
    run_spmd(2, _correctness_rank, S, path, inputs, refs, backend=S["backend"])
    os.remove(path)


# ----------------------------------------------------------------------------- timing

def _flux_flops(cfg: dict, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one transformer forward: 24 d^2 per token per block (projections and MLP,
    MLP ratio 4) plus 4 S^2 d per block for attention."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    s = image_tokens + text_tokens
    return blocks * (24 * d * d * s + 4 * s * s * d)


def _timing_inputs(cfg: dict, latent_hw, text_len: int, device, dtype) -> dict:
    """FluxModel.forward's keyword arguments: a model-space latent, sigma and the conditioning on the device."""
    g = torch.Generator().manual_seed(11)
    h, w = latent_hw
    latent = torch.randn(1, 16, h, w, generator=g)
    context = torch.randn(1, text_len, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g)
    cond = flux_conditioning(context, pooled, 3.5 if cfg.get("guidance_embeds") else None)
    cond = {k: v.to(device, dtype) for k, v in cond.items()}
    return dict(x=latent.to(device, dtype), sigma=torch.full((1,), 0.7, device=device), cond=cond)


@torch.inference_mode()
def _time_forward(model: FluxModel, inp: dict, device, warmup: int, iters: int) -> list:
    fwd = lambda: model.forward(**inp)  # noqa: E731
    for _ in range(warmup):
        fwd()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fwd()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fwd()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _timing_rank(rank: int, world_size: int, S: dict) -> None:
    device = _device(rank, S["cpu"])
    dtype = torch.bfloat16
    cfg = flux_config(S["timing_preset"])
    t0 = time.perf_counter()
    transformer = random_flux(cfg, seed=0, dtype=dtype, device=device)
    _sync(device)
    emit("timing_build", rank=rank, preset=S["timing_preset"], build_s=round(time.perf_counter() - t0, 1),
         params_b=round(sum(p.numel() for p in transformer.parameters()) / 1e9, 3), **_peak(device))
    inputs = {res: _timing_inputs(cfg, hw, S["timing_text"], device, dtype) for res, hw in S["resolutions"].items()}
    ctx = torch.randn(1, S["timing_text"], cfg["joint_attention_dim"], generator=torch.Generator().manual_seed(5))
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=torch.Generator().manual_seed(6))

    def time_config(model, gpus, layout, kernel, res):
        hw = S["resolutions"][res]
        image_tokens = (hw[0] // 2) * (hw[1] // 2)
        rec = dict(rank=rank, gpus=gpus, layout=layout, kernel=kernel, res=res, image_tokens=image_tokens,
                   text_tokens=S["timing_text"])
        try:
            _reset_peak(device)
            times = _time_forward(model, inputs[res], device, S["warmup"], S["iters"])
            med = statistics.median(times)
            flops = _flux_flops(cfg, image_tokens, S["timing_text"])
            rec.update(median_ms=round(med, 2), all_ms=[round(x, 2) for x in times],
                       tflops_per_gpu=round(flops / gpus / med / 1e9, 1), **_peak(device))
        except Exception as e:
            rec["error"] = _err_text(e)
        emit("timing_forward", **rec)

    def time_sample(model, gpus, layout, kernel):
        res = S["sample_res"]
        h, w = S["resolutions"][res]
        rec = dict(rank=rank, gpus=gpus, layout=layout, kernel=kernel, res=res, steps=S["sample_steps"])
        try:
            _reset_peak(device)
            latent = torch.zeros(1, 16, h, w)
            if gpus > 1:
                _barrier(device)
            _sync(device)
            marks = []
            t0 = time.perf_counter()
            out = sample(model, flux_conditioning(ctx, pooled, 3.5), latent, seed=42, steps=S["sample_steps"],
                         callback=lambda i, n, x0: marks.append(time.perf_counter()))  # x0 is on the CPU: synced
            _sync(device)
            wall = time.perf_counter() - t0
            steps_ms = [(b - a) * 1e3 for a, b in zip([t0] + marks[:-1], marks)]
            rec.update(wall_s=round(wall, 3), per_step_ms=round(wall / S["sample_steps"] * 1e3, 1),
                       first_step_ms=round(steps_ms[0], 1), median_step_ms=round(statistics.median(steps_ms), 1),
                       finite=bool(torch.isfinite(out).all()), **_peak(device))
        except Exception as e:
            rec["error"] = _err_text(e)
        emit("timing_sample", **rec)

    # One GPU: every rank times the unmodified model on its own device at once (independent devices).
    single = FluxModel(transformer, None)
    for res in S["resolutions"]:
        time_config(single, 1, "single", "sdpa_default", res)
    time_sample(single, 1, "single", "sdpa_default")
    del single
    if world_size < 2:
        return
    _barrier(device)
    # Two GPUs: the same weights, processors swapped to USP attention (one layout at a time).
    for layout_name, layout in LAYOUTS.items():
        mesh = build_mesh(ParallelConfig(**layout), device)
        kname = "cpu" if S["cpu"] else "cudnn"
        model = FluxModel(transformer, mesh, kname)
        for res in S["resolutions"]:
            time_config(model, 2, layout_name, kname, res)
        if layout_name == "ulysses2":
            time_sample(model, 2, layout_name, kname)
            for extra in S["extra_kernels"]:
                time_config(FluxModel(transformer, mesh, extra), 2, layout_name, extra, S["sample_res"])
        _barrier(device)


def part_timing(S: dict, world_size: int) -> None:
    run_spmd(min(world_size, 2), _timing_rank, S, backend=S["backend"])


# ----------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="env,probe,correctness,timing")
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on gloo/CPU (default when CUDA is absent)")
    args = parser.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    S = settings(cpu)
    world_size = 2 if cpu else torch.cuda.device_count()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    runners = dict(env=lambda: part_env(S), probe=lambda: part_probe(S),
                   correctness=lambda: part_correctness(S, world_size), timing=lambda: part_timing(S, world_size))
    status = 0
    for p in parts:
        t0 = time.time()
        try:
            runners[p]()
            emit("done", name=p, s=round(time.time() - t0, 1))
        except Exception as e:
            status = 1
            emit("failed", name=p, s=round(time.time() - t0, 1), error=_err_text(e),
                 trace=traceback.format_exc().strip().splitlines()[-12:])
    return status


if __name__ == "__main__":
    sys.exit(main())
