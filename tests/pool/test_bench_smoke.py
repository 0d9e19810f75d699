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
