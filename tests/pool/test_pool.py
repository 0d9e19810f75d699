"""The worker pool on real torchrun processes (CPU, gloo): lifecycle, faults, progress, multi-node.

Every failure test asserts the error text and that no process or shared-memory segment is left.
Each test runs with a temp dir of its own, which must hold no pool directory (cxd-pool-*,
cxd-join-*) once it ends: a controller killed by SIGKILL included.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
import torch

from comfy_xdit.models.flux import FluxModel, flux_conditioning
from comfy_xdit.pool.controller import (DeadlineExceeded, PoolDied, PoolOptions, PoolStartError, RequestCancelled,
                                        RequestFailed, WorkerPool)
from comfy_xdit.pool.protocol import REPLY_TYPES, Channel, connect, list_segments
from comfy_xdit.sampling import sample
from tests.flux_tiny import make_tiny_flux, write_flux_checkpoint

FAULTS = {"CXD_ALLOW_FAULT_INJECTION": "1"}


@pytest.fixture(autouse=True)
def private_tmp(monkeypatch, tmp_path_factory):
    """A temp dir for this test alone (its subprocesses inherit it through TMPDIR), so that what a
    test leaves behind is told from what the other pools on this machine use: none may be left."""
    tmp_path_factory.getbasetemp()  # pytest's own tmp_path stays where it is
    path = tempfile.mkdtemp(prefix="pooltest-")  # short: the pool's socket path must fit in 108 bytes
    monkeypatch.setenv("TMPDIR", path)
    monkeypatch.setattr(tempfile, "tempdir", path)
    yield path
    left = [os.path.basename(p) for p in glob.glob(os.path.join(path, "cxd-*"))]
    shutil.rmtree(path, ignore_errors=True)
    assert not left, f"pool directories left behind: {left}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pids(pool: WorkerPool) -> list[int]:
    return [r["pid"] for r in pool.info["ranks"]] + [pool._proc.pid]


def _assert_gone(pids: list[int], pool_id: str, within: float = 10.0) -> None:
    end = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "worker processes left behind"
    assert list_segments(pool_id) == [], "shared-memory segments left behind"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "flux_tiny.safetensors"
    write_flux_checkpoint(make_tiny_flux(seed=3), path, layout="comfy")
    return str(path)


def _inputs(seed=0, h=8, w=12, text=8):
    g = torch.Generator().manual_seed(seed)
    return {"positive.context": torch.randn(1, text, 64, generator=g),
            "positive.pooled": torch.randn(1, 32, generator=g), "latent": torch.zeros(1, 16, h, w)}


def _positive(inp, guidance=None):
    """The positive conditioning of a request's tensors, as sample() takes it in one process."""
    return flux_conditioning(inp["positive.context"], inp["positive.pooled"], guidance)


@pytest.fixture
def pool2():
    pool = WorkerPool(PoolOptions(nproc=2, env=FAULTS))
    yield pool
    pool.shutdown()


def _load(pool, checkpoint, **parallel):
    args, _ = pool.request("load_model", {"path": checkpoint, "dtype": "fp32", "parallel": parallel or None})
    return args["model_key"]


def test_sample_matches_single_process_and_reports_progress(pool2, checkpoint):
    key = _load(pool2, checkpoint, ulysses_degree=2)
    events = []
    args, out = pool2.request("sample", {"model_key": key, "seed": 5, "steps": 4, "preview": True},
                              {**_inputs(), "positive.guidance": torch.tensor([3.5])},
                              on_progress=lambda a, preview: events.append((a, preview)))
    inp = _inputs()
    reference = sample(FluxModel.load(checkpoint, dtype=torch.float32), _positive(inp, 3.5),
                       inp["latent"], seed=5, steps=4)
    err = float((out["samples"] - reference).norm() / reference.norm())
    assert err <= 1e-4, err
    assert [e[0]["step"] for e in events] == [1, 2, 3, 4] and all(e[0]["total"] == 4 for e in events)
    assert all(e[0]["elapsed"] >= 0 for e in events) and events[-1][1].shape == (1, 16, 8, 12)
    assert list_segments(pool2.pool_id) == []


def test_twenty_requests_reuse_one_pool(pool2, checkpoint):
    key = _load(pool2, checkpoint)
    for i in range(20):
        assert _load(pool2, checkpoint) == key
        pool2.request("sample", {"model_key": key, "seed": i, "steps": 1}, _inputs(i))
    status, _ = pool2.request("status")
    assert pool2.starts == 1 and [m["key"] for m in status["models"]] == [key]
    assert status["world_size"] == 2 and len({r["pid"] for r in status["ranks"]}) == 2


def test_bad_requests_fail_clearly_and_the_pool_lives_on(pool2, checkpoint, tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(RequestFailed, match=f"model file not found: '{missing}'"):
        pool2.request("load_model", {"path": missing})
    with pytest.raises(RequestFailed, match=r"degrees multiply to 3 .*ulysses 3\) but there are 2 ranks"):
        pool2.request("load_model", {"path": checkpoint, "parallel": {"ulysses_degree": 3}})
    not_flux = tmp_path / "unet.safetensors"
    from safetensors.torch import save_file
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(not_flux))
    with pytest.raises(RequestFailed, match="not a diffusion transformer this pack knows .*Known families: Flux.1, "
                                            "HunyuanDiT, PixArt-α / PixArt-Σ, Qwen-Image, SD3 / SD3.5"):
        pool2.request("load_model", {"path": str(not_flux)})
    key = _load(pool2, checkpoint)
    with pytest.raises(RequestFailed, match="does not split into 2x2 patches: Flux.1 needs image sizes that are "
                                            "multiples of 16 px"):
        pool2.request("sample", {"model_key": key, "seed": 0, "steps": 1}, _inputs(h=7, w=12))
    pool2.request("sample", {"model_key": key, "seed": 0, "steps": 1}, _inputs())
    assert pool2.starts == 1


def test_rank_killed_mid_request_fails_it_then_restart_reloads(pool2, checkpoint):
    key = _load(pool2, checkpoint)
    pids, pool_id = _pids(pool2), pool2.pool_id
    victim = pool2.info["ranks"][1]["pid"]

    def kill_at_step_two(args, _):
        if args["step"] == 2:
            os.kill(victim, signal.SIGKILL)

    with pytest.raises(PoolDied, match=f"rank 1 \\(pid {victim}\\) died"):
        pool2.request("sample", {"model_key": key, "seed": 0, "steps": 400}, _inputs(), on_progress=kill_at_step_two)
    _assert_gone(pids, pool_id)
    args, out = pool2.request("sample", {"model_key": key, "seed": 0, "steps": 2}, _inputs())
    assert pool2.starts == 2 and out["samples"].shape == (1, 16, 8, 12)


def test_rank_error_names_the_rank_and_its_last_error(pool2, checkpoint):
    key = _load(pool2, checkpoint)
    pids, pool_id = _pids(pool2), pool2.pool_id
    with pytest.raises(PoolDied, match=r"(?s)rank 1 .*died; last error: rank 1: Traceback.*CUDA out of memory"):
        pool2.request("sample", {"model_key": key, "seed": 0, "steps": 50, "fail_on_rank": 1, "fail_at_step": 2},
                      _inputs())
    _assert_gone(pids, pool_id)


def test_cancel_mid_denoise_then_a_normal_request(pool2, checkpoint):
    key = _load(pool2, checkpoint)
    cancel = threading.Event()
    seen = []

    def on_progress(args, _):
        seen.append(args["step"])
        if args["step"] == 3:
            cancel.set()

    with pytest.raises(RequestCancelled, match="cancelled"):
        pool2.request("sample", {"model_key": key, "seed": 0, "steps": 400}, _inputs(), on_progress=on_progress,
                      cancel=cancel)
    assert max(seen) <= 5, seen  # the ranks stop at the next step boundary, not at the end
    args, out = pool2.request("sample", {"model_key": key, "seed": 0, "steps": 2}, _inputs())
    assert pool2.starts == 1 and out["samples"].shape == (1, 16, 8, 12)
    assert list_segments(pool2.pool_id) == []


def test_an_exception_in_the_progress_callback_cancels_the_ranks(pool2, checkpoint):
    key = _load(pool2, checkpoint)

    class Interrupted(Exception):
        pass

    def on_progress(args, _):
        if args["step"] == 2:
            raise Interrupted("user pressed cancel")

    with pytest.raises(Interrupted):
        pool2.request("sample", {"model_key": key, "seed": 0, "steps": 400}, _inputs(), on_progress=on_progress)
    pool2.request("status")
    assert pool2.starts == 1


def test_deadline(pool2, checkpoint):
    key = _load(pool2, checkpoint)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="passed its deadline of 0.5 s"):
        pool2.request("sample", {"model_key": key, "seed": 0, "steps": 2000}, _inputs(), deadline_s=0.5)
    assert time.monotonic() - start < 5
    pool2.request("status")
    assert pool2.starts == 1


def test_malformed_oversized_and_unauthenticated_clients(pool2):
    pool2.request("status")
    sock, secret = os.path.join(pool2._dir, "rank0.sock"), pool2._secret
    assert os.stat(sock).st_mode & 0o777 == 0o600
    rank0 = pool2.info["ranks"][0]["pid"]
    pool2._channel.close()  # step aside: rank 0 serves one controller at a time
    import multiprocessing

    with pytest.raises(multiprocessing.AuthenticationError):
        connect(sock, b"x" * 32, timeout=5)
    raw = connect(sock, secret, timeout=5)
    channel = Channel(raw, pool2.pool_id, REPLY_TYPES)
    assert channel.recv(timeout=10)[0]["type"] == "ready"
    raw.send_bytes(b"\x80\x04not json")
    reply, _ = channel.recv(timeout=10)
    assert reply["type"] == "error" and "malformed request" in reply["args"]["message"]
    try:  # over the 1 MiB limit: rank 0 answers from the length header, then drops the connection
        raw.send_bytes(b"x" * (2 << 20))
    except BrokenPipeError:
        pass  # it may drop us before the whole message is written
    replies = []
    with pytest.raises((EOFError, OSError)):
        while True:
            replies.append(channel.recv(timeout=10)[0])
    assert all(r["type"] == "error" and "malformed request" in r["args"]["message"] for r in replies)
    assert _alive(rank0)
    pool2._channel = Channel(connect(sock, secret, timeout=5), pool2.pool_id, REPLY_TYPES)
    assert pool2._channel.recv(timeout=10)[0]["type"] == "ready"
    assert pool2.request("status")[0]["world_size"] == 2 and pool2.starts == 1


def test_start_failures_report_the_root_cause(tmp_path):
    with pytest.raises(PoolStartError, match="cannot start the worker pool with python '/nonexistent/python'"):
        WorkerPool(PoolOptions(nproc=1, python="/nonexistent/python")).start()
    pool = WorkerPool(PoolOptions(nproc=2, device="cuda"))  # no GPU here: every rank fails in its setup
    with pytest.raises(PoolStartError, match=r"(?s)failed to start: rank \d: Traceback.*(CUDA|cuda)"):
        pool.start()
    assert pool._proc is None
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'this python has no torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(PoolStartError, match="(?s)launcher output:.*this python has no torch"):
        WorkerPool(PoolOptions(nproc=1, python=str(fake))).start()


def _start_controller(tmp_path, nproc: int, checkpoint: str | None = None) -> tuple[subprocess.Popen, dict]:
    """A controller in a process of its own with a running pool (its model loaded where given), and
    what it says of that pool: ranks (pids), launcher (pid), pool_id, dir."""
    script = tmp_path / "controller.py"
    load = f'pool.request("load_model", {{"path": {checkpoint!r}, "dtype": "fp32"}})' if checkpoint else "pool.start()"
    script.write_text(textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from comfy_xdit.pool.controller import PoolOptions, WorkerPool
        pool = WorkerPool(PoolOptions(nproc={nproc}))
        {load}
        print(json.dumps(dict(ranks=[r["pid"] for r in pool.info["ranks"]], launcher=pool._proc.pid,
                              pool_id=pool.pool_id, dir=pool._dir)), flush=True)
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, f"the controller exited with code {proc.wait()} before its pool ran"
    return proc, json.loads(line)


def test_controller_killed_takes_the_workers_down_and_rank_0_removes_the_pool_dir(checkpoint, tmp_path):
    proc, pool = _start_controller(tmp_path, 2, checkpoint)
    try:
        pids = pool["ranks"] + [pool["launcher"]]
        assert all(_alive(p) for p in pids) and os.path.isdir(pool["dir"])
        proc.kill()
        proc.wait()
        _assert_gone(pids, pool["pool_id"], within=10.0)
        assert not os.path.exists(pool["dir"])  # rank 0 removed it before it exited
    finally:
        proc.kill()


def test_a_pool_start_sweeps_the_dir_of_a_controller_killed_with_its_ranks(tmp_path):
    """Everything SIGKILLed at once (a service manager stopping the whole cgroup): no rank is left
    to remove the directory; the next pool start does (tests/pool/test_pool_dirs.py: which ones)."""
    dead, dead_pool = _start_controller(tmp_path, 1)
    try:
        dead.send_signal(signal.SIGSTOP)  # it cannot clean up after its ranks
        for pid in [dead_pool["launcher"], *dead_pool["ranks"]]:  # torchrun starts each rank in a session of its own
            os.kill(pid, signal.SIGKILL)
        _assert_gone(dead_pool["ranks"] + [dead_pool["launcher"]], dead_pool["pool_id"])
        dead.kill()
        dead.wait()
        assert os.path.isdir(dead_pool["dir"])
        pool = WorkerPool(PoolOptions(nproc=1))
        try:
            pool.start()
            assert not os.path.exists(dead_pool["dir"]) and os.path.isdir(pool._dir)
        finally:
            pool.shutdown()
        assert not os.path.exists(pool._dir)
    finally:
        dead.kill()


def test_two_launchers_form_one_pool(checkpoint):
    from comfy_xdit.spmd import free_port

    port = free_port()
    pool = WorkerPool(PoolOptions(nproc=2, nnodes=2, master_port=port))
    started = threading.Thread(target=pool.start)
    started.start()
    joiner = subprocess.Popen([sys.executable, "-m", "worker.join", "--nnodes", "2", "--node-rank", "1",
                               "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "--device", "cpu"])
    try:
        started.join(timeout=180)
        assert pool.alive and pool.info["world_size"] == 4
        key = _load(pool, checkpoint, ulysses_degree=2, ring_degree=2)
        _, out = pool.request("sample", {"model_key": key, "seed": 1, "steps": 3}, _inputs(seed=1))
        inp = _inputs(seed=1)
        reference = sample(FluxModel.load(checkpoint, dtype=torch.float32), _positive(inp),
                           inp["latent"], seed=1, steps=3)
        assert float((out["samples"] - reference).norm() / reference.norm()) <= 1e-4
        pool.shutdown()
        assert joiner.wait(timeout=30) == 0
    finally:
        pool.shutdown()
        joiner.kill()


def test_pipefusion_through_the_pool(pool2, checkpoint):
    args, _ = pool2.request("load_model", {"path": checkpoint, "dtype": "fp32", "parallel": {"pipefusion_degree": 2},
                                           "num_pipeline_patch": 2, "warmup_steps": 4})
    _, out = pool2.request("sample", {"model_key": args["model_key"], "seed": 2, "steps": 4}, _inputs(seed=2))
    inp = _inputs(seed=2)
    reference = sample(FluxModel.load(checkpoint, dtype=torch.float32), _positive(inp), inp["latent"],
                       seed=2, steps=4)
    assert float((out["samples"] - reference).norm() / reference.norm()) <= 1e-4  # synchronous: exact


def test_lora_with_pipefusion_patches_each_stages_blocks(pool2, checkpoint, tmp_path):
    """A kohya LoRA on the first and the last block, so on both stages: through pp 2 it equals one process
    with the LoRA merged, and strength 0 gives the base back."""
    from safetensors.torch import save_file

    from comfy_xdit.models.flux.lora import load_flux_lora
    from comfy_xdit.models.lora import LoraMerger, model_shapes

    base = FluxModel.load(checkpoint, dtype=torch.float32)
    width = base.config["num_attention_heads"] * base.config["attention_head_dim"]
    g = torch.Generator().manual_seed(9)
    lora = {}
    for name, (rows, cols) in (("double_blocks_0_img_attn_qkv", (3 * width, width)),
                               ("single_blocks_1_linear2", (width, 5 * width))):
        lora[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, cols, generator=g) * 0.3
        lora[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, 4, generator=g) * 0.3
    path = str(tmp_path / "two_stages.safetensors")
    save_file(lora, path)
    args, _ = pool2.request("load_model", {"path": checkpoint, "dtype": "fp32", "parallel": {"pipefusion_degree": 2},
                                           "num_pipeline_patch": 2, "warmup_steps": 3})
    inp = _inputs(seed=5)
    run = {"model_key": args["model_key"], "seed": 5, "steps": 3}
    _, merged = pool2.request("sample", {**run, "loras": [[path, 1.0]]}, inp)
    _, plain = pool2.request("sample", {**run, "loras": [[path, 0.0]]}, inp)
    reference_base = sample(base, _positive(inp), inp["latent"], seed=5, steps=3)
    LoraMerger(base.transformer).set_loras([("k", load_flux_lora(path, model_shapes(base.transformer)), 1.0)])
    reference = sample(base, _positive(inp), inp["latent"], seed=5, steps=3)
    assert float((reference - reference_base).norm() / reference_base.norm()) > 1e-2  # the LoRA matters
    assert float((merged["samples"] - reference).norm() / reference.norm()) <= 1e-4
    assert float((plain["samples"] - reference_base).norm() / reference_base.norm()) <= 1e-4


def test_pipefusion_with_ulysses_inside_stages_through_a_4_rank_pool(checkpoint):
    pool = WorkerPool(PoolOptions(nproc=4))
    try:
        args, _ = pool.request("load_model", {"path": checkpoint, "dtype": "fp32", "num_pipeline_patch": 2,
                                              "parallel": {"pipefusion_degree": 2, "ulysses_degree": 2},
                                              "warmup_steps": 3})
        assert args["parallel"]["pipefusion_degree"] == 2 and args["parallel"]["ulysses_degree"] == 2
        assert args["weight_dtype"] == "fp32"
        _, out = pool.request("sample", {"model_key": args["model_key"], "seed": 3, "steps": 3}, _inputs(seed=3))
        inp = _inputs(seed=3)
        reference = sample(FluxModel.load(checkpoint, dtype=torch.float32), _positive(inp),
                           inp["latent"], seed=3, steps=3)
        assert float((out["samples"] - reference).norm() / reference.norm()) <= 1e-4  # synchronous: exact
        with pytest.raises(RequestFailed, match=r"text length \(7 tokens\) to divide by 2"):
            pool.request("sample", {"model_key": args["model_key"], "seed": 3, "steps": 1}, _inputs(seed=3, text=7))
        assert pool.alive  # a refused request leaves the pool serving
    finally:
        pool.shutdown()
