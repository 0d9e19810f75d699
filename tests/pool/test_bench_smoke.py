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
