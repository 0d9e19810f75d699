"""The benchmark command end to end on CPU ranks with the tiny preset: it runs and reports rows."""

import json

from comfy_xdit import bench


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
