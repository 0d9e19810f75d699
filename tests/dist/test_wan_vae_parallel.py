"""Patch-parallel Wan VAE decode/encode on real gloo processes (groups of 2, 3 and 4 ranks) vs wan.decode/encode.

One spawn of 4 processes, as tests/dist/test_vae_parallel.py: a group of ranks 2-3, one of ranks 1-3 and the
default group (all 4) each run every case. Reduced Wan 2.1 (16 latent channels, 8x) and Wan 2.2 (48 channels,
residual blocks, patch 2, 16x) VAEs with random weights, norms perturbed. Decodes take 3 latent frames, so the
causal caches carry across chunks (and the temporal upsamplers' caches with them); encodes take 5 to 9 frames
(chunks of 1 and 4). Fresh weights and inputs each run (TEST_SEED reproduces a failure).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.distributed as dist
from diffusers import AutoencoderKLWan

from comfy_xdit.spmd import run_spmd
from comfy_xdit.vae import wan
from comfy_xdit.vae.wan_parallel import check_decode_fits, estimate_decode_bytes, parallel_decode, parallel_encode

TOL = 1e-5  # fp32 max abs error vs one process
SEED = int(os.environ.get("TEST_SEED", random.randrange(2**31)))
WORLD_SIZE = 4
GROUPS = {2: (2, 3), 3: (1, 2, 3), 4: None}  # group size -> its global ranks; None: the default group
TINY = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
VAES = {"wan21": TINY,
        "wan22": dict(TINY, base_dim=8, decoder_base_dim=12, z_dim=48, is_residual=True, in_channels=12,
                      out_channels=12, patch_size=2, scale_factor_spatial=16)}
# name: (vae, kind, shape); decode takes a latent [B, T, h, w] (channels from the VAE), encode an IMAGE [F, H, W, C]
CASES = {
    "dec21-8x6": ("wan21", "decode", (1, 3, 8, 6)),  # even bands at 2 and 4 ranks, uneven at 3
    "dec21-7x5-b2": ("wan21", "decode", (2, 3, 7, 5)),  # uneven at every size, two videos
    "dec21-4x3": ("wan21", "decode", (1, 2, 4, 3)),  # one latent row per band at 4 ranks
    "dec22-8x6": ("wan22", "decode", (1, 3, 8, 6)),
    "dec22-5x4": ("wan22", "decode", (1, 3, 5, 4)),  # uneven at every size
    "enc21-9f-64x48": ("wan21", "encode", (9, 64, 48, 3)),  # 8 latent rows, three chunks
    "enc21-7f-61x45": ("wan21", "encode", (7, 61, 45, 4)),  # crop to 56x40 (7 rows), alpha dropped, 5 frames used
    "enc22-5f-99x83": ("wan22", "encode", (5, 99, 83, 3)),  # crop to 96x80: 6 rows of 16 px
}


def _vae(cfg: dict, seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**cfg)
    with torch.no_grad():  # RMS norms start at 1: perturb so a misplaced weight or row shows
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval().requires_grad_(False)


def _input(vaes: dict, name: str, seed: int) -> torch.Tensor:
    vae, kind, shape = CASES[name]
    g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
    if kind == "decode":
        b, t, h, w = shape
        return torch.randn(b, vaes[vae].config.z_dim, t, h, w, generator=g)
    return torch.rand(*shape, generator=g)


def _handler(vae_path: str, seed: int) -> dict:
    """The worker's decode / encode requests on the world group (the pool's own path), by case name."""
    from worker.handlers import WorkerState

    state = WorkerState(torch.device("cpu"), dist.group.WORLD, os.path.dirname(vae_path))
    loaded = state._load_vae({"path": vae_path})
    vaes = {"wan21": state.vaes[loaded["model_key"]][0]}
    out = {"loaded": {k: v for k, v in loaded.items() if k != "model_key"}}
    for name in ("dec21-8x6", "dec21-4x3", "enc21-7f-61x45"):  # 4x3: one row per rank at 4, 3 rows: one rank
        latent = CASES[name][1] == "decode"
        x = _input(vaes, name, seed)
        if name == "dec21-4x3":
            x = x[..., :3, :]
        _, got = state._vae("decode" if latent else "encode", {"vae_key": loaded["model_key"]},
                            {"samples" if latent else "images": x})
        out[name] = got.get("images" if latent else "samples")
    return out


def _rank_main(rank: int, world_size: int, vaes: dict, seed: int, vae_path: str) -> dict:
    results = {"handler": _handler(vae_path, seed)}
    for size, members in GROUPS.items():
        group = dist.new_group(list(members)) if members else None  # every rank takes part in creating it
        if rank not in (members or range(world_size)):
            continue
        for name, (vae, kind, _) in CASES.items():
            run = parallel_decode if kind == "decode" else parallel_encode
            results[size, name] = run(vaes[vae], _input(vaes, name, seed), group)
        try:  # fewer latent rows than ranks: every rank refuses before any collective
            parallel_decode(vaes["wan21"], torch.zeros(1, 16, 2, size - 1, 4), group)
        except ValueError as e:
            results[size, "too-few-rows"] = str(e)
    results["left-patched"] = [n for v in vaes.values() for n, m in v.named_modules() if "forward" in m.__dict__]
    return results


@pytest.fixture(scope="module")
def vaes():
    return {name: _vae(cfg, seed=SEED % 1000 + i) for i, (name, cfg) in enumerate(VAES.items())}


@pytest.fixture(scope="module")
def reference(vaes):
    out = {}
    for name, (vae, kind, _) in CASES.items():
        run = wan.decode if kind == "decode" else wan.encode
        out[name] = run(vaes[vae], _input(vaes, name, SEED))
    return out


@pytest.fixture(scope="module")
def parallel(vaes, tmp_path_factory):
    path = wan.write_wan_vae_checkpoint(vaes["wan21"], tmp_path_factory.mktemp("vae") / "wan_2.1_vae.safetensors")
    return run_spmd(WORLD_SIZE, _rank_main, vaes, SEED, str(path))


def test_reference_shapes(vaes, reference):
    """ComfyUI's frame counts: T latent frames decode to 1 + 4 (T - 1); F frames encode to 1 + (F - 1) // 4."""
    want = {"dec21-8x6": (9, 64, 48, 3), "dec21-7x5-b2": (18, 56, 40, 3), "dec21-4x3": (5, 32, 24, 3),
            "dec22-8x6": (9, 128, 96, 3), "dec22-5x4": (9, 80, 64, 3), "enc21-9f-64x48": (1, 16, 3, 8, 6),
            "enc21-7f-61x45": (1, 16, 2, 7, 5), "enc22-5f-99x83": (1, 48, 2, 6, 5)}
    assert {name: tuple(x.shape) for name, x in reference.items()} == want


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


def test_worker_handler_decodes_and_encodes_video(parallel, vaes, reference):
    """worker/handlers.py's _vae takes 5-D latents and video IMAGEs; rows are the latent's dim -2."""
    got = parallel[0]["handler"]
    assert got["loaded"] == dict(latent_channels=16, latent_format="wan21", is_video=True, spatial_ratio=8,
                                 temporal_ratio=4)
    few = wan.decode(vaes["wan21"], _input(vaes, "dec21-4x3", SEED)[..., :3, :])  # 3 rows < 4 ranks: rank 0 alone
    for name, want in (("dec21-8x6", reference["dec21-8x6"]), ("enc21-7f-61x45", reference["enc21-7f-61x45"]),
                       ("dec21-4x3", few)):
        assert got[name].shape == want.shape and (got[name] - want).abs().max() <= TOL, name
    assert all(parallel[r]["handler"][name] is None for r in range(1, WORLD_SIZE) for name in CASES
               if name in parallel[r]["handler"])


@pytest.mark.parametrize("size", sorted(GROUPS))
def test_too_few_rows(parallel, size):
    for rank in GROUPS[size] or range(WORLD_SIZE):
        assert parallel[rank][size, "too-few-rows"] == (
            f"latent of shape (1, 16, 2, {size - 1}, 4) has {size - 1} latent rows, fewer than the {size} ranks "
            "sharing it: every rank needs at least one row; use a smaller group or one device"), f"rank {rank}"


def test_original_forwards_restored(parallel):
    assert [results["left-patched"] for results in parallel] == [[]] * WORLD_SIZE


def test_reference_is_not_trivial(vaes, reference):
    """Bands decoded or encoded alone (no halo, no shared attention) miss by far more than TOL."""
    for name in ("dec21-8x6", "dec22-8x6", "enc21-9f-64x48", "enc22-5f-99x83"):
        vae, kind, _ = CASES[name]
        x = _input(vaes, name, SEED)
        if kind == "decode":
            naive = torch.cat([wan.decode(vaes[vae], b) for b in x.tensor_split(2, dim=-2)], dim=1)
        else:
            r = wan.spatial_ratio(vaes[vae])
            x = wan._crop(x, r)
            naive = torch.cat([wan.encode(vaes[vae], b) for b in x.split(x.shape[1] // r // 2 * r, dim=1)], dim=-2)
        assert reference[name].std() > 0.02, name
        assert (naive - reference[name]).abs().max() > 1e-3, name


def test_estimate_decode_bytes_falls_with_ranks():
    full21 = dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
    full22 = dict(full21, base_dim=160, decoder_base_dim=256, patch_size=2)
    for config, shape, most in ((full21, (1, 16, 21, 60, 104), 8), (full22, (1, 48, 31, 44, 80), 8),
                                (VAES["wan21"], (1, 16, 3, 7, 5), 4)):
        est = [estimate_decode_bytes(config, shape, ranks) for ranks in range(1, most + 1)]
        assert all(a > b for a, b in zip(est, est[1:])), (shape, est)
    one = estimate_decode_bytes(full21, (1, 16, 21, 60, 104), 1)
    assert estimate_decode_bytes(full21, (1, 16, 21, 60, 104), 1, dtype=torch.bfloat16) < one
    assert estimate_decode_bytes(full21, (1, 16, 41, 60, 104), 1) > one  # more frames, more memory


def test_a_decode_that_cannot_fit_is_refused_with_what_it_needs():
    full21 = dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
    shape = (1, 16, 21, 90, 160)  # 81 frames of 1280x720
    need_one = estimate_decode_bytes(full21, shape, 1, torch.bfloat16)
    with pytest.raises(MemoryError, match=r"decoding 81 frames of 1280x720 px needs about [\d.]+ GB per GPU on "
                                          r"1 GPU\(s\); [\d.]+ GB free on cuda:0; it would fit on \d+ GPUs"):
        check_decode_fits(full21, shape, 1, torch.bfloat16, need_one // 2)
    check_decode_fits(full21, shape, 1, torch.bfloat16, need_one)  # exactly enough: no error
