"""Patch-parallel VAE decode/encode on real gloo processes (groups of 2, 3 and 4 ranks) vs loader.decode/encode.

One spawn of 4 processes: a group of ranks 2-3, one of ranks 1-3 and the default group (all 4) each run
every case, so group ranks differ from global ranks; most of a spawn's cost is importing torch and
diffusers, so one spawn keeps the file fast. Fresh random weights and inputs each run (the seed is in
every failure message; TEST_SEED reproduces it).
"""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
import torch.distributed as dist
from diffusers import AutoencoderKL

from comfy_xdit.spmd import run_spmd
from comfy_xdit.vae import loader
from comfy_xdit.vae.parallel import band_rows, estimate_decode_bytes, parallel_decode, parallel_encode

TOL = 1e-5  # fp32 max abs error vs one process
SEED = int(os.environ.get("TEST_SEED", random.randrange(2**31)))
WORLD_SIZE = 4
GROUPS = {2: (2, 3), 3: (1, 2, 3), 4: None}  # group size -> its global ranks; None: the default group
VAES = {"flux16": dict(latent=16, layers=1, quant=False), "sd4": dict(latent=4, layers=2, quant=True)}
# name: (vae, kind, shape); decode takes a latent [B, h, w] (channels from the VAE), encode an IMAGE [B, H, W, C]
CASES = {
    "dec-12x10": ("flux16", "decode", (1, 12, 10)),  # even bands at 2, 3 and 4 ranks
    "dec-13x9": ("flux16", "decode", (2, 13, 9)),  # uneven at every size; batch 2: statistics per item
    "dec-10x14": ("sd4", "decode", (1, 10, 14)),  # even at 2, uneven at 3 and 4
    "dec-4x6": ("sd4", "decode", (1, 4, 6)),  # one latent row per band at 4 ranks
    "enc-96x80": ("flux16", "encode", (1, 96, 80, 3)),  # 12 latent rows
    "enc-107x75": ("sd4", "encode", (2, 107, 75, 4)),  # center crop to 104x72 (13 rows), alpha dropped
    "enc-83x115-nhwc": ("flux16", "encode", (1, 83, 115, 3)),  # crop to 80x112 (10 rows); see _input
}


def _vae(latent: int, layers: int, quant: bool, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=layers, latent_channels=latent,
                        norm_num_groups=32, use_quant_conv=quant, use_post_quant_conv=quant)
    with torch.no_grad():  # norms start at 1/0: perturb so a misplaced weight or statistic shows
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval().requires_grad_(False)


def _input(vaes: dict, name: str, seed: int) -> torch.Tensor:
    vae, kind, shape = CASES[name]
    g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
    if kind == "decode":
        b, h, w = shape
        return torch.randn(b, vaes[vae].config.latent_channels, h, w, generator=g)
    if name.endswith("nhwc"):  # an ordinary contiguous IMAGE: the reference is fp64, see reference()
        return torch.rand(*shape, generator=g)
    # stored [B, C, H, W] so loader.encode's movedim yields a contiguous tensor: on channels-last input
    # torch's fp32 CPU GroupNorm itself misses fp64 by up to ~1e-5 at these sizes
    b, h, w, c = shape
    return torch.rand(b, c, h, w, generator=g).movedim(1, -1)


def _rank_main(rank: int, world_size: int, vaes: dict, seed: int) -> dict:
    results = {}
    for size, members in GROUPS.items():
        group = dist.new_group(list(members)) if members else None  # every rank takes part in creating it
        if rank not in (members or range(world_size)):
            continue
        for name, (vae, kind, _) in CASES.items():
            run = parallel_decode if kind == "decode" else parallel_encode
            results[size, name] = run(vaes[vae], _input(vaes, name, seed), group)
        try:  # fewer latent rows than ranks: every rank refuses before any collective
            parallel_decode(vaes["flux16"], torch.zeros(1, 16, size - 1, 4), group)
        except ValueError as e:
            results[size, "too-few-rows"] = str(e)
    results["left-patched"] = [n for v in vaes.values() for n, m in v.named_modules() if "forward" in m.__dict__]
    return results


@pytest.fixture(scope="module")
def vaes():
    return {name: _vae(**kw, seed=SEED % 1000 + i) for i, (name, kw) in enumerate(VAES.items())}


@pytest.fixture(scope="module")
def reference(vaes):
    """One process, fp32; for the channels-last IMAGE fp64, as torch's fp32 CPU GroupNorm is the larger error there."""
    out = {}
    for name, (vae, kind, _) in CASES.items():
        run = loader.decode if kind == "decode" else loader.encode
        model, x = vaes[vae], _input(vaes, name, SEED)
        if name.endswith("nhwc"):
            model, x = copy.deepcopy(model).double(), x.double()
        out[name] = run(model, x).float()
    return out


@pytest.fixture(scope="module")
def parallel(vaes):
    return run_spmd(WORLD_SIZE, _rank_main, vaes, SEED)


@pytest.mark.parametrize("size", sorted(GROUPS))
def test_parallel_matches_single_process(parallel, reference, size):
    members = GROUPS[size] or tuple(range(WORLD_SIZE))
    for name, expected in reference.items():
        got = parallel[members[0]][size, name]
        assert got is not None and got.shape == expected.shape and got.dtype == torch.float32, name
        err = (got - expected).abs().max().item()
        assert err <= TOL, f"seed {SEED}: {size} ranks, {name}: max abs err {err:.2e}"
        others = {r: parallel[r].get((size, name), "not a member") for r in range(WORLD_SIZE) if r != members[0]}
        assert others == {r: None if r in members else "not a member" for r in others}, \
            f"{name}: only the group's first rank returns the result"


@pytest.mark.parametrize("size", sorted(GROUPS))
def test_too_few_rows(parallel, size):
    for rank in GROUPS[size] or range(WORLD_SIZE):
        assert parallel[rank][size, "too-few-rows"] == (
            f"latent of shape (1, 16, {size - 1}, 4) has {size - 1} latent rows, fewer than the {size} ranks "
            "sharing it: every rank needs at least one row; use a smaller group or one device"), f"rank {rank}"


def test_original_forwards_restored(parallel):
    assert [results["left-patched"] for results in parallel] == [[]] * WORLD_SIZE


def test_reference_is_not_trivial(vaes, reference):
    # Bands decoded or encoded alone (no halo, local statistics) must miss by far more than TOL.
    for name in ("dec-13x9", "enc-96x80"):
        vae, kind, _ = CASES[name]
        x = _input(vaes, name, SEED)
        if kind == "decode":
            naive = torch.cat([loader.decode(vaes[vae], b) for b in x.tensor_split(2, dim=-2)], dim=1)
        else:
            naive = torch.cat([loader.encode(vaes[vae], b) for b in x.tensor_split(2, dim=1)], dim=-2)
        assert reference[name].std() > 0.05, name
        assert (naive - reference[name]).abs().max() > 1e-2, name


def test_bands_follow_tensor_split():
    for rows in range(1, 12):
        for parts in range(1, rows + 1):
            assert band_rows(rows, parts) == [len(c) for c in torch.arange(rows).tensor_split(parts)]


def test_estimate_decode_bytes_falls_with_ranks():
    flux, tiny = dict(block_out_channels=(128, 256, 512, 512)), dict(block_out_channels=(32, 32, 64, 64))
    for config, shape, most in ((flux, (1, 16, 128, 128), 8), (flux, (2, 16, 256, 192), 8), (tiny, (1, 4, 13, 9), 4)):
        est = [estimate_decode_bytes(config, shape, ranks) for ranks in range(1, most + 1)]
        assert all(a > b for a, b in zip(est, est[1:])), (shape, est)  # the largest band shrinks at each step here
    one = estimate_decode_bytes(flux, (1, 16, 128, 128), 1)
    assert estimate_decode_bytes(flux, (1, 16, 128, 128), 1, dtype=torch.bfloat16) < one
    assert estimate_decode_bytes(flux, (2, 16, 128, 128), 1) == 2 * one


def test_a_decode_that_cannot_fit_is_refused_with_what_it_needs():
    from comfy_xdit.vae.parallel import check_decode_fits

    flux = dict(block_out_channels=(128, 256, 512, 512))
    shape = (1, 16, 1024, 1024)  # 8192 px
    need_one = estimate_decode_bytes(flux, shape, 1, torch.bfloat16)
    budget = need_one // 3
    with pytest.raises(MemoryError, match=r"decoding 8192x8192 px needs about [\d.]+ GB per GPU on 1 GPU\(s\); "
                                          r"[\d.]+ GB free on cuda:0; it would fit on \d+ GPUs"):
        check_decode_fits(flux, shape, 1, torch.bfloat16, budget)
    check_decode_fits(flux, shape, 1, torch.bfloat16, need_one)  # exactly enough: no error
