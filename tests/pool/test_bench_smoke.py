"""The benchmark command end to end on CPU ranks with the tiny preset: it runs and reports rows."""

import importlib.util
import json

import pytest

from comfy_xdit import bench
from comfy_xdit.models.family import family_for_preset
from comfy_xdit.pool.controller import PoolDied, RequestFailed

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def test_bench_runs_through_the_pool(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.main(["--device", "cpu", "--preset", "tiny", "--px", "128", "--gpus", "1,2", "--steps", "2",
                       "--strategies", "ulysses,ring", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["gpus"], r["strategy"]) for r in rows] == [(1, "single"), (2, "ulysses"), (2, "ring")]
    assert all(r["seconds"] >= r["denoise_s"] > 0 and r["steps"] == 2 for r in rows)
    assert "TFLOP/s/GPU" in capsys.readouterr().out


def test_bench_runs_a_video_family(tmp_path, capsys):
    out = tmp_path / "wan.json"
    assert bench.main(["--device", "cpu", "--preset", "tiny-wan-t2v", "--px", "32x48", "--frames", "5", "--cfg", "5",
                       "--gpus", "2", "--steps", "2", "--strategies", "cfg_parallel,ulysses", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["strategy"], r["px"]) for r in rows] == [("cfg_parallel", "32x48x5f"), ("ulysses", "32x48x5f")]
    assert all(r["seconds"] >= r["denoise_s"] > 0 and r["tflops_per_gpu"] >= 0 for r in rows)


def test_bench_vae_decode_through_the_pool(tmp_path, capsys):
    out = tmp_path / "vae.json"
    assert bench.main(["--device", "cpu", "--vae", "--px", "64", "--gpus", "2", "--weight-dtype", "fp32",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["gpus"], r["px"]) for r in rows] == [(2, 64)]
    assert rows[0]["seconds"] >= rows[0]["decode_s"] > 0
    assert "peak GiB/GPU" in capsys.readouterr().out


def test_qwen_image_flops_and_tokens():
    """Qwen-Image at 1328 px: a 166x166 latent, 83x83 = 6889 image tokens; per forward 60 dual-stream blocks of
    q, k, v, o and a 4x MLP per token (24 s d^2) plus joint attention over text + image (4 s^2 d)."""
    family = family_for_preset("qwen-image")
    config = family.preset_config("qwen-image")
    shape = bench.latent_shape(family, config, (1328, 1328), 0)
    assert shape == (1, 16, 166, 166) and family.token_grid(shape) == (83, 83)
    s, d = 6889 + 128, 3072
    assert bench.flops_per_step(config, 6889, 128) == 60 * (24 * s * d * d + 4 * s * s * d)  # ~131.7 TFLOP


def test_bench_runs_qwen_image(tmp_path, capsys):
    """Qwen-Image through the pool, cfg 4 with a negative prompt, beside diffusers' QwenImagePipeline on the CPU
    (where transformers, which diffusers' pipeline needs, is installed); a later run takes its diffusers time."""
    out = tmp_path / "qwen.json"
    baseline = ["--baseline"] if HAS_TRANSFORMERS else []
    common = ["--device", "cpu", "--preset", "tiny-qwen-image", "--px", "64", "--cfg", "4", "--steps", "2",
              "--text-tokens", "8"]
    assert bench.main(common + ["--gpus", "2", "--strategies", "cfg_parallel,auto", "--json", str(out)]
                      + baseline) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["strategy"], r["layout"], r["px"]) for r in rows] == [
        ("cfg_parallel", {"cfg_degree": 2}, "64x64"), ("auto", {"cfg_degree": 2}, "64x64")]
    assert all(r["seconds"] >= r["denoise_s"] > 0 and r["tflops_per_gpu"] >= 0 for r in rows)
    assert result["run"] == dict(preset="tiny-qwen-image", steps=2, cfg=4.0, text_tokens=8, frames=0)
    if HAS_TRANSFORMERS:
        assert result["baselines"]["64x64"] > 0 and all(r["speedup_vs_diffusers"] > 0 for r in rows)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="diffusers' QwenImagePipeline needs transformers")
def test_qwen_diffusers_baseline_runs_true_cfg():
    """The baseline's QwenImagePipeline call: two batch-1 forwards a step with cfg (one without), on the image
    tokens and the given text embeddings."""
    family = family_for_preset("tiny-qwen-image")
    config = family.preset_config("tiny-qwen-image")
    for cfg, forwards in ((4.0, 4), (1.0, 2)):
        run = bench.diffusers_pipeline(family, config, (64, 96), 8, cfg=cfg, device="cpu")
        seen = []
        run.pipe.transformer.register_forward_hook(
            lambda _m, _a, kw, _out: seen.append((tuple(kw["hidden_states"].shape),
                                                  tuple(kw["encoder_hidden_states"].shape))), with_kwargs=True)
        run(2)
        assert seen == [((1, 6 * 4, 64), (1, 8, 64))] * forwards  # 64x96 px: 4x6 tokens of 2x2x16


def test_pixart_flops_and_tokens():
    """PixArt-Σ at 2048 px: a 256x256 latent of 4 channels, 128x128 = 16,384 image tokens; per forward 28 blocks of
    self-attention (q, k, v, o: 8 s d^2; 4 s^2 d), cross-attention (q, o on the image: 4 s d^2; k, v on the text:
    4 t d^2; 4 s t d) and a 4x MLP (16 s d^2); the T5 text width (caption_channels) is 4096."""
    family = family_for_preset("pixart-sigma-xl-2-2048")
    config = family.preset_config("pixart-sigma-xl-2-2048")
    shape = bench.latent_shape(family, config, (2048, 2048), 0)
    assert shape == (1, 4, 256, 256) and family.token_grid(shape) == (128, 128)
    assert bench.text_width(config) == 4096
    s, t, d = 16384, 120, 1152
    flops = bench.flops_per_step(config, s, t)
    assert flops == 28 * (28 * s * d * d + 4 * t * d * d + 4 * s * s * d + 4 * s * t * d)  # ~51.9 TFLOP
    assert 51e12 < flops < 53e12


def test_bench_runs_pixart(tmp_path, capsys):
    """PixArt-Σ through the pool, cfg 4.5 with a negative prompt (cfg_parallel and Ulysses over 2 ranks), beside
    diffusers' PixArtSigmaPipeline on the CPU where transformers is installed."""
    out = tmp_path / "pixart.json"
    baseline = ["--baseline"] if HAS_TRANSFORMERS else []
    assert bench.main(["--device", "cpu", "--preset", "tiny-pixart-sigma", "--px", "64", "--cfg", "4.5", "--steps",
                       "2", "--text-tokens", "8", "--gpus", "2", "--strategies", "cfg_parallel,ulysses", "--json",
                       str(out)] + baseline) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["strategy"], r["layout"], r["px"]) for r in rows] == [
        ("cfg_parallel", {"cfg_degree": 2}, "64x64"), ("ulysses", {"ulysses_degree": 2}, "64x64")]
    assert all(r["seconds"] >= r["denoise_s"] > 0 and r["tflops_per_gpu"] >= 0 for r in rows)
    if HAS_TRANSFORMERS:
        assert result["baselines"]["64x64"] > 0 and all(r["speedup_vs_diffusers"] > 0 for r in rows)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="diffusers' PixArt pipelines need transformers")
def test_pixart_diffusers_baseline_runs_cfg_in_one_batch():
    """The baseline's PixArt pipelines: Σ's for Σ, α's (with the size / aspect-ratio micro-conditions) for α; one
    batch-2 forward a step with cfg (batch 1 without), at the asked size (no resolution binning), on the given
    T5 states."""
    for preset, cls, micro in (("tiny-pixart-sigma", "PixArtSigmaPipeline", None),
                               ("tiny-pixart-alpha", "PixArtAlphaPipeline", [96.0, 64.0])):
        family = family_for_preset(preset)
        config = family.preset_config(preset)
        for cfg, batch in ((4.5, 2), (1.0, 1)):
            run = bench.diffusers_pipeline(family, config, (64, 96), 8, cfg=cfg, device="cpu")
            assert type(run.pipe).__name__ == cls
            assert type(run.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
            seen = []
            run.pipe.transformer.register_forward_hook(
                lambda _m, args, kw, _out: seen.append((tuple(args[0].shape), tuple(kw["encoder_hidden_states"].shape),
                                                        kw["added_cond_kwargs"]["resolution"])), with_kwargs=True)
            run(2)
            assert [(x, c) for x, c, _ in seen] == [((batch, 4, 12, 8), (batch, 8, 64))] * 2  # 64x96 px: 8x12 latent
            assert all((r is None) == (micro is None) for _, _, r in seen)
            if micro:
                assert seen[0][2].tolist() == [micro] * batch  # [height, width] in pixels


def test_bench_records_sampling_out_of_memory(tmp_path, monkeypatch):
    """A layout let through at load that runs out of memory while sampling is a row, not a crash: refused (the
    pool's memory error) or failed (a worker died; that pool's remaining runs are skipped, the exit status is 1)."""
    class FakePool:
        def __init__(self, options):
            self.nproc, self.samples = options.nproc, 0

        def request(self, kind, args=None, tensors=None, on_progress=None):
            if kind == "load_model":
                return dict(model_key="k", parallel={"pipefusion_degree": self.nproc}, weight_dtype="bf16"), {}
            if kind == "sample":
                self.samples += 1
                if self.nproc == 1:
                    raise PoolDied("rank 0 exited: torch.OutOfMemoryError: CUDA out of memory")
                if self.samples == 1:
                    raise RequestFailed("needs 27.0 GB per GPU", kind="memory")
                return dict(elapsed=0.5, peak_memory=[]), {}
            return {}, {}

        def shutdown(self):
            pass

    monkeypatch.setattr(bench, "WorkerPool", FakePool)
    out = tmp_path / "oom.json"
    assert bench.main(["--device", "cpu", "--preset", "tiny-qwen-image", "--px", "64", "--cfg", "4", "--gpus", "1,2",
                       "--steps", "2", "--strategies", "auto,pipefusion", "--compile", "both", "--json",
                       str(out)]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert [(r["gpus"], r["strategy"], r["compile"], "failed" in r, "refused" in r) for r in rows] == [
        (1, "single", False, True, False),  # the dead pool's compiled run is skipped
        (2, "auto", False, False, True), (2, "auto", True, False, False),
        (2, "pipefusion", False, False, False), (2, "pipefusion", True, False, False)]
    assert "CUDA out of memory" in rows[0]["failed"] and rows[1]["layout"] == {"pipefusion_degree": 2}
