"""The workers' CUDA_VISIBLE_DEVICES: the GPUs PoolOptions names, never the controller's own setting."""

from __future__ import annotations

from comfy_xdit.pool.controller import PoolOptions, WorkerPool
from comfy_xdit.pool.protocol import new_pool_id, new_secret


def _environment(tmp_path, **options) -> dict:
    pool = WorkerPool(PoolOptions(**options))
    pool._dir, pool._secret, pool.pool_id = str(tmp_path), new_secret(), new_pool_id()  # what start() sets
    return pool._environment()


def test_workers_see_the_chosen_gpus_in_rank_order(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert _environment(tmp_path, nproc=2, device="cuda", gpus=[6, 4])["CUDA_VISIBLE_DEVICES"] == "6,4"
    assert _environment(tmp_path, nproc=2, device="cuda")["CUDA_VISIBLE_DEVICES"] == "0,1"  # none: the first nproc
    assert "CUDA_VISIBLE_DEVICES" not in _environment(tmp_path, nproc=2, device="cpu", gpus=[6, 4])
