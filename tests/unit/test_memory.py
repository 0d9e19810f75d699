"""Per-rank memory: stage-only loading reads only the stage's tensors, the estimator matches what a real
load holds, and the check refuses layouts that do not fit with a message that says what would."""

import os
import random
import re

import pytest
import torch
from diffusers import FluxTransformer2DModel

import comfy_xdit.models.checkpoint as checkpoint_io
from comfy_xdit.client import WEIGHT_DTYPES
from comfy_xdit.config import ParallelConfig
from comfy_xdit.memory import GB, WEIGHT_STORAGE, NotEnoughMemory, auto_layout, check_memory, estimate_memory, stage_bounds
from comfy_xdit.models.checkpoint import read_header
from comfy_xdit.models.flux import FLUX, FluxModel
from comfy_xdit.models.flux.checkpoint import FLUX_BLOCKS, keep_stage, load_flux_transformer, store_blocks_fp8
from comfy_xdit.models.flux.random import flux_config, random_flux
from comfy_xdit.pipefusion import stage_ranges
from comfy_xdit.pipefusion.stage import DiTStage
from tests.flux_tiny import tiny_checkpoint

SEED = int(os.environ.get("TEST_SEED", random.randrange(2**31)))
CONFIG = dict(num_layers=4, num_single_layers=4)  # 8 blocks: up to 4 stages of 2, or uneven by cost


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, model = tiny_checkpoint(tmp_path_factory.mktemp("memory"), seed=SEED % 1000, **CONFIG)
    return path, dict(model.config)


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _bfl_resident(key: str, start: int, stop: int, num_double: int, num_blocks: int) -> bool:
    """The stage's BFL keys, written out independently of the loader's key mapping."""
    if m := re.match(r"double_blocks\.(\d+)\.", key):
        return start <= int(m.group(1)) < stop
    if m := re.match(r"single_blocks\.(\d+)\.", key):
        return start <= num_double + int(m.group(1)) < stop
    if key.startswith(("img_in.", "txt_in.")):
        return start == 0
    if key.startswith("final_layer."):
        return stop == num_blocks
    return True  # time_in, vector_in, guidance_in: every stage


class _Recorder:
    """safe_open stand-in that records every tensor read."""

    def __init__(self, real, read):
        self.real, self.read = real, read

    def __call__(self, *args, **kwargs):
        recorder = self

        class Handle:
            def __enter__(self):
                self.f = recorder.real(*args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, key):
                t = self.f.get_tensor(key)
                recorder.read[key] = t.numel() * t.element_size()
                return t

        return Handle()


@pytest.mark.parametrize("stages", [2, 4])
def test_stage_load_reads_only_its_tensors_and_equals_load_then_drop(checkpoint, monkeypatch, stages):
    path, config = checkpoint
    header, n = read_header(path), CONFIG["num_layers"] + CONFIG["num_single_layers"]
    full, _ = load_flux_transformer(path, dtype=torch.float32)
    bounds = stage_bounds(FLUX, config, stages)
    assert bounds == stage_ranges(FLUX_BLOCKS.costs(full), stages, None)  # what PipeFusionModel computes
    file_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
    for rank, (start, stop) in enumerate(bounds):
        read = {}
        monkeypatch.setattr(checkpoint_io, "safe_open", _Recorder(checkpoint_io.safe_open, read))
        model, _ = load_flux_transformer(path, dtype=torch.float32, stage=(start, stop))
        monkeypatch.undo()
        want = {k for k in header if _bfl_resident(k, start, stop, CONFIG["num_layers"], n)}
        assert set(read) == want
        assert sum(read.values()) == sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in want)
        assert sum(read.values()) < 0.75 * file_bytes
        # the same residency and values as loading everything and letting PipeFusion's stage drop the rest
        dropped, _ = load_flux_transformer(path, dtype=torch.float32)
        DiTStage(FluxModel(dropped), start, stop)
        got, expect = model.state_dict(), dropped.state_dict()
        assert got.keys() == expect.keys() and all(torch.equal(got[k], expect[k]) for k in expect)


@pytest.mark.parametrize("storage,stages", [("bf16", 1), ("fp8_e4m3fn", 1), ("bf16", 2), ("bf16", 4),
                                            ("fp8_e4m3fn", 2), ("fp32", 2)])
def test_estimate_equals_loaded_bytes(checkpoint, storage, stages):
    path, config = checkpoint
    compute, fp8 = WEIGHT_STORAGE[storage]
    estimates = estimate_memory(FLUX, config, ParallelConfig(pipefusion_degree=stages), storage)
    bounds = stage_bounds(FLUX, config, stages) if stages > 1 else [None]
    assert len(estimates) == len(bounds)
    for stage, estimate in zip(bounds, estimates):
        model, _ = load_flux_transformer(path, dtype=compute, fp8=fp8, stage=stage)
        assert estimate.weights == _bytes(model) and estimate.activations == 0  # exact (asked: within 5%)


def test_full_size_flux_dev():
    config = flux_config("flux-dev")
    with torch.device("meta"):
        meta = FluxTransformer2DModel(**config)
    assert sum(p.numel() for p in meta.parameters()) == 11_901_408_320
    one = ParallelConfig()
    assert estimate_memory(FLUX, config, one, "bf16")[0].weights == 23_802_816_640  # 23.8 GB
    assert estimate_memory(FLUX, config, one, "fp32")[0].weights == 2 * 23_802_816_640
    # fp8: 11.83e9 block Linear weights at 1 byte, the other 67.2e6 parameters in bf16
    assert estimate_memory(FLUX, config, one, "fp8_e4m3fn")[0].weights == 11_968_587_904
    assert stage_bounds(FLUX, config, 2) == [(0, 17), (17, 57)]
    pp2 = estimate_memory(FLUX, config, ParallelConfig(pipefusion_degree=2), "fp8_e4m3fn")
    assert [e.weights for e in pp2] == [5_868_803_072, 6_164_309_120]
    # activations at 1024 px, one GPU: 18 widths x 4608 tokens x 3072 x 2 bytes (17.2 measured on an H200)
    assert estimate_memory(FLUX, config, one, "bf16", image_size=(1024, 1024))[0].activations == 509_607_936
    # PipeFusion adds its stale K/V: 2 x 4608 x 3072 x 2 bytes per resident block
    pp2 = estimate_memory(FLUX, config, ParallelConfig(pipefusion_degree=2), "bf16", image_size=(1024, 1024))
    assert [e.activations for e in pp2] == [509_607_936 + 17 * 56_623_104, 509_607_936 + 40 * 56_623_104]


@pytest.mark.parametrize("parallel,storage,free,message", [
    (ParallelConfig(), "bf16", 16 * GB,
     "needs 23.8 GB per GPU with bf16; 16.0 GB free on cuda:0; fp8 would need 12.0 GB"),
    (ParallelConfig(ulysses_degree=2), "bf16", 10 * GB,
     "needs 23.8 GB per GPU with bf16; 10.0 GB free on cuda:0; pipefusion 2 with fp8 would need 6.2 GB"),
    (ParallelConfig(ulysses_degree=4), "bf16", 4 * GB,
     "needs 23.8 GB per GPU with bf16; 4.0 GB free on cuda:0; pipefusion 4 with fp8 would need 3.1 GB"),
    (ParallelConfig(pipefusion_degree=2), "fp8_e4m3fn", 5 * GB,
     "needs 6.2 GB per GPU with pipefusion 2 and fp8; 5.0 GB free on cuda:0; "
     "use more GPUs (pipefusion splits the blocks over them)"),
    (ParallelConfig(ulysses_degree=2), "bf16", 2 * GB,
     "needs 23.8 GB per GPU with bf16; 2.0 GB free on cuda:0; even pipefusion 2 with fp8 would need 6.2 GB: "
     "use more GPUs"),
])
def test_check_refuses_with_what_would_fit(parallel, storage, free, message):
    with pytest.raises(NotEnoughMemory) as exc:
        check_memory(FLUX, flux_config("flux-dev"), parallel, storage, free, "cuda:0")
    assert str(exc.value) == message and isinstance(exc.value, MemoryError)


def test_check_passes_and_counts_the_image():
    config, pp2 = flux_config("flux-dev"), ParallelConfig(pipefusion_degree=2)
    ok = check_memory(FLUX, config, pp2, "fp8_e4m3fn", 7 * GB, "cuda:1")
    assert ok.weights == 6_164_309_120  # the larger stage
    with pytest.raises(NotEnoughMemory, match=r"^needs 9\.1 GB per GPU with pipefusion 2 and fp8; 7\.0 GB free "
                                              r"on cuda:1; use more GPUs"):
        check_memory(FLUX, config, pp2, "fp8_e4m3fn", 7 * GB, "cuda:1", image_size=(1024, 1024))


def test_storage_names_match_the_client():
    assert tuple(WEIGHT_STORAGE) == WEIGHT_DTYPES


@pytest.mark.parametrize("fp8,stage", [(False, (2, 6)), (True, (0, 3)), (True, None)])
def test_random_stage_equals_the_whole_model_cut(fp8, stage):
    config = flux_config("tiny", **CONFIG)
    whole = random_flux(config, seed=SEED, dtype=torch.bfloat16)
    if stage is not None:
        keep_stage(whole, *stage)
    if fp8:
        store_blocks_fp8(whole)
    part = random_flux(config, seed=SEED, dtype=torch.bfloat16, fp8=fp8, stage=stage)
    got, want = part.state_dict(), whole.state_dict()
    assert got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8))
        for k in want)


def test_auto_layout_prefers_sequence_parallel_then_pipefusion_then_fp8():
    config = flux_config("flux-dev")
    gb = 10**9
    # 2 GPUs: weights 23.8 GB bf16, about half per PipeFusion stage, about half again in fp8
    assert auto_layout(FLUX, config, 2, "bf16", 40 * gb, "cuda:0") == (ParallelConfig(ulysses_degree=2), "bf16")
    assert auto_layout(FLUX, config, 2, "bf16", 16 * gb, "cuda:0") == (ParallelConfig(pipefusion_degree=2), "bf16")
    assert auto_layout(FLUX, config, 2, "bf16", 10 * gb, "cuda:0") == (ParallelConfig(pipefusion_degree=2), "fp8_e4m3fn")
    # 4 GPUs: two stages with Ulysses 2 inside each come before four stages
    assert auto_layout(FLUX, config, 4, "bf16", 16 * gb, "cuda:0") == \
        (ParallelConfig(pipefusion_degree=2, ulysses_degree=2), "bf16")
    # fp16 weights are never swapped for fp8 by auto (fp8 computes in bf16), only suggested
    with pytest.raises(NotEnoughMemory, match=r"needs 15.0 GB per GPU with pipefusion 2 and fp16; 10.0 GB free on "
                                              r"cuda:1; pipefusion 2 with fp8 would need 9.1 GB"):
        auto_layout(FLUX, config, 2, "fp16", 10 * gb, "cuda:1")
    with pytest.raises(NotEnoughMemory, match=r"with pipefusion 2 and fp8; 4.0 GB free on cuda:0; use more GPUs"):
        auto_layout(FLUX, config, 2, "bf16", 4 * gb, "cuda:0")


def test_sample_activations_count_the_real_tokens_rows_and_stages():
    """The sample-time check: the load's activation term at the job's own token count, times the rows one forward
    holds (the dp share, twice for cfg on one rank), the stale K/V of the stage's own blocks."""
    from comfy_xdit.memory import sample_activations
    from comfy_xdit.models.qwen import QWEN
    from comfy_xdit.models.wan import WAN

    config = QWEN.preset_config("qwen-image")
    one = ParallelConfig()
    at_1328 = estimate_memory(QWEN, config, one, "bf16", (1328, 1328))[0].activations
    assert sample_activations(QWEN, config, one, "bf16", (1, 16, 1, 166, 166), guided=False) == at_1328
    assert sample_activations(QWEN, config, one, "bf16", (1, 16, 1, 166, 166), guided=True) == 2 * at_1328
    cfg2 = ParallelConfig(cfg_degree=2)
    assert sample_activations(QWEN, config, cfg2, "bf16", (1, 16, 1, 166, 166), guided=True) == at_1328
    dp2 = ParallelConfig(dp_degree=2)
    assert sample_activations(QWEN, config, dp2, "bf16", (3, 16, 1, 166, 166), guided=False) == 2 * at_1328
    pp2 = ParallelConfig(pipefusion_degree=2)
    stage = estimate_memory(QWEN, config, pp2, "bf16", (1328, 1328))[0]
    assert sample_activations(QWEN, config, pp2, "bf16", (1, 16, 1, 166, 166), False, 30) == stage.activations
    # video: every frame's tokens count (the load-time term sees one frame)
    wan = WAN.preset_config("wan2.1-t2v-1.3b")
    frame = sample_activations(WAN, wan, one, "bf16", (1, 16, 1, 60, 104), guided=False)
    assert sample_activations(WAN, wan, one, "bf16", (1, 16, 21, 60, 104), guided=False) > 15 * frame
