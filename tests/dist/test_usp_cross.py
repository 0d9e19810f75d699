"""USP cross-attention (sharded image queries, replicated text K/V) on real gloo processes vs one process.

A toy self+cross-attention transformer (the Wan / PixArt / HunyuanDiT block shape) whose attention
calls are injected: plain SDPA in this process, USPAttention.__call__ (self) and USPAttention.cross
(cross) on the ranks, with the image tokens sharded over the sequence-parallel ranks and the text
whole on every rank. One process group per world size runs every layout and input case.
Fresh random weights and inputs each run (the seed is in every failure message; TEST_SEED replays).
"""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from comfy_xdit.attention.kernels import get_kernel
from comfy_xdit.attention.usp import USPAttention
from comfy_xdit.config import ParallelConfig
from comfy_xdit.mesh import build_mesh

TOL = 1e-4
SEED = int(os.environ.get("TEST_SEED", random.randrange(2**31)))  # TEST_SEED reproduces a failure
HEADS, HEAD_DIM = 4, 16
DIM, IN_DIM, TEXT_DIM, DEPTH, BATCH = HEADS * HEAD_DIM, 24, 40, 2, 2
IMAGE_TOKENS = (12, 20)  # not powers of two; both split over 2 and 4 ranks
TEXT_LENS = (7, 8)       # 7 splits over neither degree, 8 over both: replicated either way
LAYOUTS = {
    2: [dict(ulysses_degree=2), dict(ring_degree=2)],
    4: [dict(ulysses_degree=4), dict(ring_degree=4), dict(ulysses_degree=2, ring_degree=2)],
}


def rel_err(a, b) -> float:
    # tests.flux_tiny's, not imported: every rank re-imports this module, and flux_tiny brings in diffusers.
    return float((a - b).norm() / b.norm())


def _key(layout: dict) -> str:
    return "x".join(f"{k.split('_')[0]}{v}" for k, v in layout.items())


class SDPA:
    """Single-process attention on [batch, seq, heads, head_dim]."""

    @staticmethod
    def _sdpa(q, k, v):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    self_attn = cross_attn = _sdpa


class USP:
    """Sequence-parallel attention: self through USPAttention.__call__, cross through `cross`."""

    def __init__(self, attention: USPAttention, cross=None):
        self.self_attn = attention
        self.cross_attn = cross or attention.cross


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(DIM), nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.out1 = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.q, self.kv, self.out2 = nn.Linear(DIM, DIM), nn.Linear(TEXT_DIM, 2 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, text, attn):
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, HEADS, HEAD_DIM)).unbind(2)
        x = x + self.out1(attn.self_attn(q, k, v).flatten(2))
        q = self.q(self.norm2(x)).unflatten(-1, (HEADS, HEAD_DIM))
        k, v = self.kv(text).unflatten(-1, (2, HEADS, HEAD_DIM)).unbind(2)
        x = x + self.out2(attn.cross_attn(q, k, v).flatten(2))
        return x + self.mlp(self.norm3(x))


class ToyDiT(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        self.proj_in = nn.Linear(IN_DIM, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.proj_out = nn.Linear(DIM, IN_DIM)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # the same weights in every process, with logits large enough to be peaked
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 * 1.5 if p.dim() == 2 else 0.1))
        self.eval().requires_grad_(False)

    def forward(self, x, text, attn):
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x, text, attn)
        return self.proj_out(x)


def _inputs(seed: int, image_tokens: int, text_len: int):
    g = torch.Generator().manual_seed(seed + 1000 * image_tokens + text_len)
    return torch.randn(BATCH, image_tokens, IN_DIM, generator=g), torch.randn(BATCH, text_len, TEXT_DIM, generator=g)


def _all_gather_seq(x, group):
    chunks = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(chunks, x.contiguous(), group=group)
    return torch.cat(chunks, dim=1)


def _variants(attention: USPAttention) -> dict[str, USP]:
    variants = {
        "cross": USP(attention),
        # Replicated K/V sent through the all-to-all (and ring) as the self-attention path sends sharded K/V.
        "kv_all_to_all": USP(attention, cross=attention),
    }
    if attention.ulysses_degree > 1:  # K/V heads sliced for the next Ulysses rank, not this one's Q heads
        wrong = copy.copy(attention)
        wrong.ulysses_rank = (attention.ulysses_rank + 1) % attention.ulysses_degree
        variants["wrong_heads"] = USP(attention, cross=wrong.cross)
    return variants


def _rank_main(rank: int, world_size: int, seed: int):
    model = ToyDiT(seed)
    results = {}
    with torch.inference_mode():
        for layout in LAYOUTS[world_size]:
            mesh = build_mesh(ParallelConfig(**layout), "cpu")
            attention = USPAttention(mesh.group("ulysses"), mesh.group("ring"), get_kernel("cpu"))
            for image_tokens in IMAGE_TOKENS:
                for text_len in TEXT_LENS:
                    x, text = _inputs(seed, image_tokens, text_len)
                    shard = x.chunk(mesh.sp_degree, dim=1)[mesh.sp_rank]  # text stays whole
                    for name, attn in _variants(attention).items():
                        out = model(shard, text, attn)
                        for axis in ("ulysses", "ring"):  # shard index is ring-major, ulysses-minor
                            if mesh.size(axis) > 1:
                                out = _all_gather_seq(out, mesh.group(axis))
                        results[(_key(layout), name, image_tokens, text_len)] = out
            if world_size == 2 and layout == dict(ulysses_degree=2):  # cross traces as one graph, collectives in
                g = torch.Generator().manual_seed(seed + rank)
                q = torch.randn(BATCH, IMAGE_TOKENS[0] // 2, HEADS, HEAD_DIM, generator=g)
                k, v = torch.randn(2, BATCH, TEXT_LENS[0], HEADS, HEAD_DIM, generator=g)
                compiled = torch.compile(attention.cross, fullgraph=True, backend="aot_eager")
                results["compile"] = (attention.cross(q, k, v), compiled(q, k, v))
    return results


@pytest.fixture(scope="module")
def reference():
    model = ToyDiT(SEED)
    with torch.inference_mode():
        return {(s, t): model(*_inputs(SEED, s, t), SDPA) for s in IMAGE_TOKENS for t in TEXT_LENS}


@pytest.fixture(scope="module")
def parallel():
    from tests.flux_tiny import spmd_per_world_size  # here, not at the top: see rel_err

    return spmd_per_world_size(_rank_main, SEED)


CASES = [(ws, _key(layout), s, t) for ws, layouts in LAYOUTS.items() for layout in layouts
         for s in IMAGE_TOKENS for t in TEXT_LENS]
IDS = [f"ws{c[0]}-{c[1]}-img{c[2]}-text{c[3]}" for c in CASES]


@pytest.mark.parametrize("world_size,layout,image_tokens,text_len", CASES, ids=IDS)
def test_cross_matches_single_process(parallel, reference, world_size, layout, image_tokens, text_len):
    expected = reference[(image_tokens, text_len)]
    for rank, results in enumerate(parallel(world_size)):
        got = results[(layout, "cross", image_tokens, text_len)]
        assert got.shape == expected.shape
        err = rel_err(got, expected)
        assert err <= TOL, f"seed {SEED}: rank {rank} {layout} img {image_tokens} text {text_len}: rel err {err:.2e}"


@pytest.mark.parametrize("world_size,layout,image_tokens,text_len",
                         [c for c in CASES if c[1].startswith("ulysses")],
                         ids=[i for c, i in zip(CASES, IDS) if c[1].startswith("ulysses")])
def test_wrong_head_slice_is_caught(parallel, reference, world_size, layout, image_tokens, text_len):
    # The comparison can fail: K/V heads that do not match the Q heads this rank received are far off.
    expected = reference[(image_tokens, text_len)]
    for rank, results in enumerate(parallel(world_size)):
        err = rel_err(results[(layout, "wrong_heads", image_tokens, text_len)], expected)
        assert err > 1e-2, f"seed {SEED}: rank {rank} {layout}: wrong head slice gave rel err only {err:.2e}"


@pytest.mark.parametrize("world_size,layout,image_tokens,text_len", CASES, ids=IDS)
def test_replicated_kv_through_all_to_all_costs_but_does_not_change(parallel, reference, world_size, layout,
                                                                     image_tokens, text_len):
    # Sending replicated K/V through the Ulysses all-to-all gives every rank each text token once per
    # Ulysses rank, and the ring hands every step the same K/V again: every key is repeated the same
    # number of times, which softmax cancels. So that path is only waste (K/V traffic, a ring, and
    # ulysses-degree times the keys per kernel call), not an error; `cross` exists for the cost.
    expected = reference[(image_tokens, text_len)]
    for rank, results in enumerate(parallel(world_size)):
        err = rel_err(results[(layout, "kv_all_to_all", image_tokens, text_len)], expected)
        assert err <= TOL, f"seed {SEED}: rank {rank} {layout}: rel err {err:.2e}"


def test_cross_compiles_as_one_graph(parallel):
    for rank, results in enumerate(parallel(2)):
        eager, compiled = results["compile"]
        assert torch.isfinite(eager).all()
        assert rel_err(compiled, eager) <= 1e-5, f"seed {SEED}: rank {rank}"


def test_reference_is_not_trivial(reference):
    # A parallel path that returned zeros or its input would not pass the comparisons above.
    for key, x in reference.items():
        assert torch.isfinite(x).all() and x.std() > 0.05, key
