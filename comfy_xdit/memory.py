"""How much GPU memory a DiT of any family needs per rank, and the check that refuses what will not fit.

Weights dominate: only PipeFusion splits them (each stage holds its blocks); Ulysses, Ring, CFG and data
parallelism replicate them. Everything is computed from the config on a meta-device model, before any
weight is read. GB here is 10^9 bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .config import ParallelConfig, _divisors
from .models.family import Family
from .models.fp8 import FP8
from .pipefusion.schedule import stage_ranges

GB = 10**9
# weight_dtype name -> (compute dtype, blocks' Linear weights stored in fp8)
WEIGHT_STORAGE = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32": (torch.float32, False),
                  "fp8_e4m3fn": (torch.bfloat16, True)}
TEXT_TOKENS = 512  # text tokens assumed by the activation term (ComfyUI's Flux T5 gives max(256, prompt tokens))
# Live activations of one forward above the weights, in hidden-state widths per token: 17.2 measured for
# FLUX.1-dev in bf16 on an H200 at 1024 and 2048 px (tests/gpu/check_memory_cuda.py), rounded up; used for
# every family until one is measured.
BLOCK_WORKSET = 18


class NotEnoughMemory(MemoryError):
    """A layout that would not fit in the free GPU memory; the message says what would."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs: its resident parameters, and the activation term (0 without an image size)."""

    weights: int
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.activations


@dataclass(frozen=True)
class _Parts:
    blocks: tuple       # per block: (fp8-storable numel, other numel)
    embed: int          # numel of the embedders (first stage)
    head: int           # numel of the head (last stage)
    shared: int         # numel on every stage (time/text/guidance embedders)
    costs: tuple        # BlockLayout.costs: what PipeFusion balances
    largest_linear: int  # numel of the largest fp8 weight (its upcast copy lives during its layer)
    width: int


def _key(config: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()
                        if not k.startswith("_")))


@functools.lru_cache(maxsize=8)
def _parts(family: Family, key: tuple) -> _Parts:
    layout = family.blocks
    model = family.meta_model(dict(key))
    costs = layout.costs(model)
    layout.store_fp8(model)  # the loaders' rule for which weights fp8 storage takes

    def split(module):
        ps = list(module.parameters())
        return (sum(p.numel() for p in ps if p.dtype == FP8), sum(p.numel() for p in ps if p.dtype != FP8))

    blocks = tuple(split(b) for b in layout.blocks(model))
    total = sum(p.numel() for p in model.parameters())
    embed = sum(sum(split(getattr(model, n))) for n in layout.embedders)
    head = sum(sum(split(getattr(model, n))) for n in layout.head)
    largest = max(p.numel() for p in model.parameters() if p.dtype == FP8)
    return _Parts(blocks, embed, head, total - embed - head - sum(map(sum, blocks)), tuple(costs), largest,
                  family.width(dict(key)))


def block_costs(family: Family, config: dict) -> tuple:
    """Parameters per block (embedders on the first, head on the last), from the config alone."""
    return _parts(family, _key(config)).costs


def stage_bounds(family: Family, config: dict, num_stages: int,
                 stage_blocks: tuple | None = None) -> list[tuple[int, int]]:
    """PipeFusion block ranges per stage from the config alone: the PipeFusion adapter runs on these."""
    return stage_ranges(list(block_costs(family, config)), num_stages, stage_blocks)


def estimate_memory(family: Family, config: dict, parallel: ParallelConfig, storage: str = "bf16",
                    image_size: tuple[int, int] | None = None,
                    explicit_bounds: list[tuple[int, int]] | None = None) -> list[MemoryEstimate]:
    """Per-rank bytes for each PipeFusion stage (one entry without PipeFusion).

    weights: the stage's blocks (+ embedders on the first, head on the last, time/text embedders on all),
    bytes per parameter from ``storage`` (fp8_e4m3fn: 1 byte for the blocks' Linear weights, 2 for the rest).
    activations, only with image_size (width, height) in pixels, batch 1, TEXT_TOKENS text tokens; per rank
    the sequence is (text + image tokens) / sp_degree. It counts: the forward's live tensors
    (BLOCK_WORKSET x sequence x width, attention by a fused kernel, so no sequence^2 term); with PipeFusion the
    stale K/V buffers (K and V over the whole sequence, one pair per resident block, for one denoiser: a
    cfg > 1 run on one rank holds two); with fp8 the upcast copy of the largest weight. Not counted: the
    CUDA context and allocator slack (mem_get_info's free memory already excludes what is in use),
    torch.compile workspaces, ControlNets, and the text encoders and VAE (other processes or steps).
    """
    compute, fp8 = WEIGHT_STORAGE[storage]
    parts, c = _parts(family, _key(config)), torch.empty((), dtype=compute).element_size()
    n, pp = len(parts.blocks), parallel.pipefusion_degree
    bounds = explicit_bounds or (stage_bounds(family, config, pp) if pp > 1 else [(0, n)])
    tokens = 0
    if image_size is not None:
        w, h = image_size
        rows, cols = family.token_grid((1, family.latent_format.channels, h // 8, w // 8))
        tokens = rows * cols
    out = []
    for start, stop in bounds:
        blocks = parts.blocks[start:stop]
        numel = parts.shared + sum(map(sum, blocks)) + (parts.embed if start == 0 else 0) + \
            (parts.head if stop == n else 0)
        weights = numel * c - (sum(b[0] for b in blocks) * (c - 1) if fp8 else 0)
        act = _activations(parts, tokens, parallel, stop - start, c, fp8) if tokens else 0
        out.append(MemoryEstimate(weights, act))
    return out


def _activations(parts: _Parts, tokens: int, parallel: ParallelConfig, blocks: int, c: int, fp8: bool,
                 rows: int = 1) -> int:
    """The activation term of estimate_memory for `tokens` image tokens and `rows` latent rows in one forward."""
    seq = -(-(TEXT_TOKENS + tokens) // parallel.sp_degree)
    act = BLOCK_WORKSET * seq * parts.width * c
    act += 2 * seq * parts.width * c * blocks if parallel.pipefusion_degree > 1 else 0
    return rows * act + (parts.largest_linear * c if fp8 else 0)


def sample_activations(family: Family, config: dict, parallel: ParallelConfig, storage: str, latent_shape: tuple,
                       guided: bool, stage_blocks: int | None = None) -> int:
    """Bytes above the resident weights that sampling `latent_shape` needs on one rank: estimate_memory's
    activation term for its real token count (frames included), times the rows one forward holds (this rank's
    data-parallel share of the batch, twice with cfg when cond and uncond share a rank: one batch, or two
    denoisers each with its PipeFusion stale K/V)."""
    compute, fp8 = WEIGHT_STORAGE[storage]
    parts, c = _parts(family, _key(config)), torch.empty((), dtype=compute).element_size()
    rows, cols = family.token_grid(tuple(latent_shape))
    batch = -(-latent_shape[0] // parallel.dp_degree) * (2 if guided and parallel.cfg_degree == 1 else 1)
    blocks = stage_blocks if stage_blocks is not None else len(parts.blocks)
    return _activations(parts, rows * cols, parallel, blocks, c, fp8, batch)


def _describe(pp: int, storage: str, joiner: str) -> str:
    name = "fp8" if WEIGHT_STORAGE[storage][1] else storage
    return f"pipefusion {pp}{joiner}{name}" if pp > 1 else name


def check_memory(family: Family, config: dict, parallel: ParallelConfig, storage: str, free_bytes: int, device: str,
                 image_size: tuple[int, int] | None = None,
                 explicit_bounds: list[tuple[int, int]] | None = None) -> MemoryEstimate:
    """The largest per-rank estimate, or NotEnoughMemory when it exceeds free_bytes, naming a layout that fits:
    fp8 storage first, then more PipeFusion stages (dp and cfg degrees kept, sequence parallelism traded).
    explicit_bounds: an explicit PipeFusion split (else balanced by parameter count)."""
    def need(pp, s):
        layout = ParallelConfig(parallel.dp_degree, parallel.cfg_degree, pp,
                                ulysses_degree=group // pp)  # only sp_degree matters to the estimate
        return max(e.total for e in estimate_memory(family, config, layout, s, image_size))

    group = parallel.pipefusion_degree * parallel.sp_degree
    estimate = max(estimate_memory(family, config, parallel, storage, image_size, explicit_bounds),
                   key=lambda e: e.total)
    if estimate.total <= free_bytes:
        return estimate
    pp, n = parallel.pipefusion_degree, len(_parts(family, _key(config)).blocks)
    more = [p for p in _divisors(group) if pp < p <= n] if family.pipefusion else []
    fp8 = "fp8_e4m3fn"
    options = ([(pp, fp8)] if storage != fp8 else []) + [(p, storage) for p in more] + \
        ([(p, fp8) for p in more] if storage != fp8 else [])
    sized = [(p, s, need(p, s)) for p, s in options]
    fits = next(((p, s, b) for p, s, b in sized if b <= free_bytes), None)
    if fits:
        hint = f"; {_describe(fits[0], fits[1], ' with ')} would need {fits[2] / GB:.1f} GB"
    elif sized:
        hint = f"; even {_describe(*sized[-1][:2], ' with ')} would need {sized[-1][2] / GB:.1f} GB: use more GPUs"
    elif family.pipefusion:
        hint = "; use more GPUs (pipefusion splits the blocks over them)"
    else:
        hint = f"; {family.label} cannot split its blocks over GPUs (no PipeFusion): use a GPU with more free memory"
    raise NotEnoughMemory(f"needs {estimate.total / GB:.1f} GB per GPU with {_describe(pp, storage, ' and ')}; "
                          f"{free_bytes / GB:.1f} GB free on {device}{hint}")


def preferred_layout(family: Family, config: dict, world_size: int, pipefusion_degree: int = 1) -> ParallelConfig:
    """The fastest layout of world_size ranks for this family, memory aside: CFG parallel first for families
    sampled with cfg > 1 (SD3: no communication inside a forward, ~2x), then sequence parallelism (as much
    Ulysses as the heads allow, the rest Ring) inside each of pipefusion_degree stages."""
    group = world_size // pipefusion_degree
    cfg = 2 if family.guided and group % 2 == 0 else 1
    sp = ParallelConfig.for_sequence_parallel(group // cfg, family.num_heads(config))
    return ParallelConfig(cfg_degree=cfg, pipefusion_degree=pipefusion_degree, ring_degree=sp.ring_degree,
                          ulysses_degree=sp.ulysses_degree)


def auto_layout(family: Family, config: dict, world_size: int, storage: str, free_bytes: int, device: str,
                image_size: tuple[int, int] = (1024, 1024)) -> tuple[ParallelConfig, str]:
    """The "auto" strategy with memory in mind: sequence parallelism over every rank when the weights fit
    (fastest), else the fewest PipeFusion stages that fit (sequence parallel inside each), and only then
    fp8 storage of bf16 weights, which changes the numbers a little. NotEnoughMemory when nothing fits."""
    stages = [p for p in _divisors(world_size) if p <= len(_parts(family, _key(config)).blocks)
              and (p == 1 or family.pipefusion)]
    storages = [storage] + (["fp8_e4m3fn"] if storage == "bf16" else [])
    for s in storages:
        for pp in stages:
            layout = preferred_layout(family, config, world_size, pp)
            if max(e.total for e in estimate_memory(family, config, layout, s, image_size)) <= free_bytes:
                return layout, s
    check_memory(family, config, ParallelConfig(pipefusion_degree=stages[-1], ulysses_degree=world_size // stages[-1]),
                      storages[-1], free_bytes, device, image_size)
    raise AssertionError("check_memory accepted a layout auto_layout refused")  # same estimate: unreachable
