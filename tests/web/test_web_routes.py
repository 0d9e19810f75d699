"""The pool-status routes and events (comfy_xdit/web_status/) through aiohttp's test client:
payload shape, file names and never paths, stop / unload reaching the engine, 405 on wrong
methods, a busy pool answered at once, the websocket events a tracked request sends, and when
the last error stops showing."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from comfy_xdit.client import Engine, ModelHandle
from comfy_xdit.web_status import (ERROR_EVENT, PROGRESS_EVENT, STATUS_EVENT, ActivityTracker, make_event_sender,
                                   nvml_memory_used, register_routes, root_cause, status_payload)
from web_fakes import GIB, MODEL_PATH, SECRET_DIRS, FakeEngine, FakePool, comfy_like_app, memory_probe


def _engine(pool=None) -> FakeEngine:
    return FakeEngine(pool if pool is not None else FakePool())


def _call(engine, tracker, steps, **options):
    """Run `steps(client)` against the routes served the way ComfyUI serves them."""
    routes = web.RouteTableDef()
    options.setdefault("memory_probe", memory_probe)
    register_routes(routes, engine, tracker, **options)

    async def main():
        async with TestClient(TestServer(comfy_like_app(routes))) as client:
            return await steps(client)

    return asyncio.run(main())


def _assert_no_dirs(text: str) -> None:
    for name in SECRET_DIRS:
        assert name not in text, f"directory {name!r} leaked: {text}"
    assert "/srv" not in text and MODEL_PATH not in text


def test_status_names_models_by_file_name_and_never_shows_paths():
    engine, tracker = _engine(), ActivityTracker()

    async def steps(client):
        out = []
        for path in ("/xdit/status", "/api/xdit/status"):
            resp = await client.get(path)
            assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
            out.append(await resp.text())
        return out

    for text in _call(engine, tracker, steps):
        _assert_no_dirs(text)
        s = json.loads(text)
        assert s["state"] == "running" and s["busy"] is False and s["stale"] is False
        assert s["device"] == "cuda" and s["world_size"] == 2 and s["gpus_requested"] == 2
        assert [r["rank"] for r in s["ranks"]] == [0, 1]
        assert s["ranks"][1]["gpu"] == "NVIDIA H100 80GB HBM3" and s["ranks"][1]["device"] == "cuda:1"
        assert s["ranks"][1]["memory_total"] == 80 * GIB and s["ranks"][1]["memory_used"] == 22 * GIB
        assert s["ranks"][1]["gpu_index"] == 3 and s["ranks"][1]["memory_free"] == 40 * GIB
        assert s["ranks"][1]["memory_allocated"] == 20 * GIB and s["ranks"][1]["memory_reserved"] == 21 * GIB
        [model] = s["models"]
        assert model["name"] == "flux1-dev.safetensors" and model["dtype"] == "bf16" and model["variant"] == "dev"
        assert model["loras"] == [{"name": "style-lora.safetensors", "strength": 0.8}]
        assert model["degrees"]["ulysses_degree"] == 2 and model["strategy"] == "Ulysses 2"
        assert s["strategy"] == "Ulysses 2" and s["degrees"] == model["degrees"]
        assert s["vaes"] == [{"name": "ae.safetensors", "dtype": "fp32"}]
        assert s["activity"] is None and s["error"] is None


def test_without_nvml_a_rank_shows_what_its_allocator_reserved():
    s = status_payload(_engine(), ActivityTracker(), memory_probe=lambda ranks: {})
    assert [r["memory_used"] for r in s["ranks"]] == [19 * GIB, 21 * GIB]
    assert [r["memory_free"] for r in s["ranks"]] == [42 * GIB, 40 * GIB]


def test_stopped_and_failed_pools():
    tracker = ActivityTracker()
    assert status_payload(FakeEngine(), tracker)["state"] == "stopped"

    pool = FakePool()
    pool.die("rank 1 (pid 4001) died; last error: rank 1: Traceback (most recent call last):\n"
             f'  File "/{SECRET_DIRS[0]}/worker/handlers.py", line 9, in _sample\n'
             f"RuntimeError: CUDA out of memory loading {MODEL_PATH}")
    s = status_payload(_engine(pool), tracker)
    assert s["state"] == "failed" and s["ranks"] == [] and s["models"] == []
    assert s["reason"] == "rank 1: RuntimeError: CUDA out of memory loading flux1-dev.safetensors"
    _assert_no_dirs(json.dumps(s))
    assert pool.requests == []  # a dead pool is not asked (asking would restart it)


def _hold_pool(pool):
    """A thread holding the pool as a running request does, for its whole length, until the returned event is
    set; returns (that event, the thread) once it holds it."""
    holding, release = threading.Event(), threading.Event()

    def request():
        with pool.running():
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=request)
    thread.start()
    holding.wait(5)
    return release, thread


def test_busy_pool_answers_at_once_with_the_last_description_and_live_progress():
    pool = FakePool()
    engine, tracker = _engine(pool), ActivityTracker()
    status_payload(engine, tracker)  # idle: remembered
    release, thread = _hold_pool(pool)
    tracker.begin("sample", model=MODEL_PATH, ranks=2, total=20)
    tracker.step(5, 20, elapsed=2.5)
    try:
        async def steps(client):
            start = time.monotonic()
            resp = await client.get("/xdit/status")
            return time.monotonic() - start, await resp.json()

        took, s = _call(engine, tracker, steps)
    finally:
        release.set()
        thread.join()
    assert took < 2.0
    assert s["state"] == "running" and s["busy"] and s["stale"]
    assert s["models"][0]["name"] == "flux1-dev.safetensors"
    a = s["activity"]
    assert a["kind"] == "sample" and a["model"] == "flux1-dev.safetensors" and (a["step"], a["total"]) == (5, 20)
    assert a["eta"] == pytest.approx(7.5) and a["active"]
    assert [r["progress"]["step"] for r in s["ranks"]] == [5, 5]


def test_stop_cancels_the_running_request_and_shuts_the_pool_down():
    pool = FakePool()
    engine, tracker = _engine(pool), ActivityTracker()
    cancel = threading.Event()
    tracker.begin("sample", model=MODEL_PATH, ranks=2, total=20, cancel=cancel)
    holding = threading.Event()

    def sampling():  # stops at the next step once cancelled, as the ranks do
        with pool.running():
            holding.set()
            assert cancel.wait(10)
        tracker.end("cancelled")

    thread = threading.Thread(target=sampling)
    thread.start()
    holding.wait(5)

    async def steps(client):
        resp = await client.post("/xdit/stop")
        return resp.status, await resp.json()

    code, body = _call(engine, tracker, steps)
    thread.join(5)
    assert code == 200 and body["ok"] and body["cancelled"] is True
    assert cancel.is_set() and pool.shutdowns == 1 and engine.current_pool() is None
    assert body["status"]["state"] == "stopped" and body["status"]["activity"]["outcome"] == "cancelled"


def test_stop_answers_202_when_the_request_does_not_end_in_time():
    pool = FakePool()
    engine = _engine(pool)
    release, thread = _hold_pool(pool)  # a decode: no cancel event, it runs to its end

    async def steps(client):
        resp = await client.post("/xdit/stop")
        answer = resp.status, await resp.json(), engine.current_pool()
        release.set()  # the decode ends
        return answer

    try:
        code, body, pool_then = _call(engine, ActivityTracker(), steps, timeout=0.5)
    finally:
        release.set()
        thread.join()
    assert code == 202 and body["pending"] and pool_then is pool
    deadline = time.monotonic() + 5
    while engine.current_pool() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.shutdowns == 1 and engine.current_pool() is None  # the stop went through once the decode ended


def test_unload_asks_the_pool_and_answers_file_names():
    pool = FakePool()
    engine, tracker = _engine(pool), ActivityTracker()

    async def steps(client):
        resp = await client.post("/api/xdit/unload")
        return resp.status, await resp.text()

    code, text = _call(engine, tracker, steps)
    _assert_no_dirs(text)
    body = json.loads(text)
    assert code == 200 and body["ok"]
    assert body["unloaded"] == ["flux1-dev.safetensors", "ae.safetensors"]
    assert ("unload_model", {"model_key": None}) in pool.requests
    assert body["status"]["models"] == [] and body["status"]["vaes"] == []
    assert pool.alive and pool.shutdowns == 0


def test_unload_while_busy_is_409_and_without_a_pool_unloads_nothing():
    pool = FakePool()
    engine = _engine(pool)
    release, thread = _hold_pool(pool)

    async def steps(client):
        resp = await client.post("/xdit/unload")
        return resp.status, await resp.json()

    try:
        code, body = _call(engine, ActivityTracker(), steps)
    finally:
        release.set()
        thread.join()
    assert code == 409 and body["ok"] is False and "busy" in body["error"]
    assert not [r for r in pool.requests if r[0] == "unload_model"]

    code, body = _call(FakeEngine(), ActivityTracker(), steps)
    assert code == 200 and body["unloaded"] == [] and body["status"]["state"] == "stopped"


def test_wrong_methods_are_405():
    engine = _engine()

    async def steps(client):
        return {(m, p): (await client.request(m, p)).status
                for m, p in [("GET", "/xdit/stop"), ("GET", "/xdit/unload"), ("POST", "/xdit/status"),
                             ("DELETE", "/xdit/status"), ("GET", "/api/xdit/stop"), ("PUT", "/api/xdit/unload")]}

    assert set(_call(engine, ActivityTracker(), steps).values()) == {405}
    assert engine.current_pool().shutdowns == 0 and engine.current_pool().requests == []


def test_a_tracked_request_sends_progress_status_and_error_events():
    pool = FakePool()
    engine, tracker = _engine(pool), ActivityTracker()
    sent = []
    tracker.add_listener(make_event_sender(lambda event, data: sent.append((event, data)), engine, tracker,
                                           memory_probe=memory_probe, min_interval=0, background=False))
    handle = ModelHandle(path=MODEL_PATH, gpus=2)
    seen = []

    def sample(model, steps, on_progress=None, cancel=None):
        for i in range(1, steps + 1):
            on_progress({"step": i, "total": steps, "elapsed": 0.1 * i}, None)
        return "latent"

    assert tracker.run(sample, handle, 3, on_progress=lambda a, p: seen.append(a["step"]), cancel=None) == "latent"
    assert seen == [1, 2, 3]  # the node's own callback still runs
    events = [e for e, _ in sent]
    assert events == [PROGRESS_EVENT] * 5 + [STATUS_EVENT]
    steps = [d["activity"]["step"] for e, d in sent if e == PROGRESS_EVENT]
    assert steps == [0, 1, 2, 3, 3]
    last = sent[-2][1]["activity"]
    assert last["active"] is False and last["outcome"] == "ok" and last["model"] == "flux1-dev.safetensors"
    assert [r["step"] for r in sent[2][1]["activity"]["ranks"]] == [2, 2]
    assert sent[-1][1]["state"] == "running" and sent[-1][1]["models"][0]["name"] == "flux1-dev.safetensors"

    sent.clear()
    pool.die("rank 1 (pid 4001) died; last error: rank 1: Traceback (most recent call last):\n"
             f'  File "/{SECRET_DIRS[0]}/x.py", line 1\nRuntimeError: CUDA out of memory. Tried to allocate 2 GiB')

    def decode(vae, samples):
        raise RuntimeError(f"xDiT worker pool: {pool.death_reason}")

    with pytest.raises(RuntimeError):
        tracker.run(decode, handle, "latent")
    assert [e for e, _ in sent] == [PROGRESS_EVENT, PROGRESS_EVENT, ERROR_EVENT, STATUS_EVENT]
    error = sent[2][1]
    assert error["summary"] == "xDiT decode failed: rank 1 (pid 4001) died"
    assert error["detail"] == "rank 1: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"
    assert sent[3][1]["state"] == "failed" and sent[3][1]["error"]["detail"] == error["detail"]
    _assert_no_dirs(json.dumps(sent))

    sent.clear()

    class InterruptProcessingException(Exception):  # ComfyUI's interrupt: no error toast
        pass

    def interrupted(model):
        raise InterruptProcessingException()

    with pytest.raises(InterruptProcessingException):
        tracker.run(interrupted, handle)
    assert ERROR_EVENT not in [e for e, _ in sent]
    assert sent[1][1]["activity"]["outcome"] == "cancelled"


def test_the_last_error_shows_until_a_request_of_its_kind_succeeds():
    """The next prompt's load succeeding does not hide that its sample failed last time, nor does a
    cancelled sample; the sample that succeeds clears it, in GET /xdit/status and in the status event.
    An error outside any request (a pool that would not start) clears with any success."""
    engine, tracker, sent = _engine(), ActivityTracker(), []
    tracker.add_listener(make_event_sender(lambda e, d: sent.append((e, d)), engine, tracker,
                                           memory_probe=memory_probe, min_interval=0, background=False))
    handle = ModelHandle(path=MODEL_PATH, gpus=2)

    class RequestCancelled(Exception):  # as the pool's, by name
        pass

    def load(model):
        return {"model_key": "k"}

    def sample(model, outcome="ok"):
        if outcome == "oom":
            raise RuntimeError("xDiT worker pool: CUDA out of memory. Tried to allocate 20.00 GiB")
        if outcome == "cancelled":
            raise RequestCancelled("cancelled")
        return "latent"

    async def error_shown(client):
        return (await (await client.get("/xdit/status")).json())["error"]

    def shown_after(fn, *args, raises=None):
        if raises is None:
            tracker.run(fn, handle, *args)
        else:
            with pytest.raises(raises):
                tracker.run(fn, handle, *args)
        status_event = [d for e, d in sent if e == STATUS_EVENT][-1]
        error = _call(engine, tracker, error_shown)
        assert error == status_event["error"]
        return error

    assert shown_after(sample, "oom", raises=RuntimeError)["kind"] == "sample"
    assert shown_after(load)["detail"] == "CUDA out of memory. Tried to allocate 20.00 GiB"
    assert shown_after(sample, "cancelled", raises=RequestCancelled)["kind"] == "sample"
    assert shown_after(sample) is None
    assert tracker.last_error is None

    tracker.fail("xDiT worker pool: the worker pool failed to start: no GPU")
    assert tracker.last_error["kind"] is None
    assert shown_after(load) is None


def test_progress_events_are_throttled_but_the_latest_step_always_arrives():
    tracker, sent = ActivityTracker(), []
    tracker.add_listener(make_event_sender(lambda e, d: sent.append(d), min_interval=60))
    tracker.begin("sample", ranks=1, total=100)
    for i in range(1, 101):
        tracker.step(i, 100)
    tracker.end()
    assert [d["activity"]["step"] for d in sent] == [0, 100, 100]

    tracker, sent = ActivityTracker(), []
    tracker.add_listener(make_event_sender(lambda e, d: sent.append(d), min_interval=0.3))
    tracker.begin("sample", ranks=1, total=20)
    for i in range(1, 8):
        tracker.step(i, 20)
    time.sleep(0.6)
    steps = [d["activity"]["step"] for d in sent]
    assert steps[0] == 0 and steps[-1] == 7 and len(steps) < 8  # held steps dropped, step 7 sent late


def test_a_broken_send_or_listener_never_fails_the_request():
    tracker = ActivityTracker()

    def broken(*_):
        raise ConnectionResetError("browser went away")

    tracker.add_listener(make_event_sender(broken))
    tracker.add_listener(broken)
    assert tracker.run(lambda model: 7, ModelHandle(path=MODEL_PATH)) == 7


def test_root_cause_of_a_launcher_failure_and_of_a_request_error():
    launcher = root_cause("the worker launcher exited with code 1; last error: launcher output:\n"
                          "Traceback (most recent call last):\n  File \"/opt/x/run.py\", line 2\n"
                          "ModuleNotFoundError: No module named 'yunchang'", "load")
    assert launcher["detail"] == "ModuleNotFoundError: No module named 'yunchang'"
    request = root_cause(RuntimeError(f"xDiT worker pool: model file not found: '{MODEL_PATH}'"), "load")
    assert request == {"summary": "xDiT load failed", "detail": "model file not found: 'flux1-dev.safetensors'",
                       "message": "model file not found: 'flux1-dev.safetensors'"}


def test_routes_on_a_real_cpu_pool(tmp_path, monkeypatch):
    """The real engine and worker pool (one CPU rank): stopped before the first request (asking never
    starts a pool), the loaded model by name, unload, stop."""
    from tests.flux_tiny import make_tiny_flux, write_flux_checkpoint

    monkeypatch.setenv("CXD_DEVICE", "cpu")
    folder = tmp_path / SECRET_DIRS[1]
    folder.mkdir()
    path = folder / "flux_tiny.safetensors"
    write_flux_checkpoint(make_tiny_flux(seed=1), path, layout="comfy")
    engine, tracker = Engine(), ActivityTracker()
    try:
        assert status_payload(engine, tracker)["state"] == "stopped" and engine.current_pool() is None
        tracker.run(engine.load, ModelHandle(path=str(path), dtype="fp32", gpus=1))
        pids = [r["pid"] for r in engine.current_pool().info["ranks"]]

        async def steps(client):
            out = []
            for method, route in [("GET", "/api/xdit/status"), ("POST", "/api/xdit/unload"),
                                  ("POST", "/api/xdit/stop"), ("GET", "/api/xdit/status")]:
                resp = await client.request(method, route)
                assert resp.status == 200, (route, await resp.text())
                out.append(await resp.text())
            return out

        before, unloaded, stopped, after = _call(engine, tracker, steps, memory_probe=nvml_memory_used)
        for text in (before, unloaded, stopped, after):
            assert str(tmp_path) not in text and SECRET_DIRS[1] not in text
        before, unloaded, after = json.loads(before), json.loads(unloaded), json.loads(after)
        assert before["state"] == "running" and before["device"] == "cpu" and before["world_size"] == 1
        assert before["ranks"][0]["device"] == "cpu" and before["ranks"][0]["memory_used"] is None
        assert [m["name"] for m in before["models"]] == ["flux_tiny.safetensors"]
        assert before["activity"]["kind"] == "load" and before["activity"]["outcome"] == "ok"
        assert unloaded["unloaded"] == ["flux_tiny.safetensors"] and unloaded["status"]["models"] == []
        assert after["state"] == "stopped" and engine.current_pool() is None
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)]
    finally:
        engine.shutdown()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_status_events_are_built_off_the_calling_thread():
    pool = FakePool()
    engine, tracker, sent = _engine(pool), ActivityTracker(), []
    release = threading.Event()
    threads = set()

    def slow_probe(ranks):  # a GPU memory query that takes its time
        threads.add(threading.current_thread().name)
        release.wait(5)
        return {}

    sender = make_event_sender(lambda e, d: sent.append((e, d)), engine, tracker, memory_probe=slow_probe)
    tracker.add_listener(sender)
    start = time.monotonic()
    for _ in range(5):
        tracker.run(lambda model: None, ModelHandle(path=MODEL_PATH))
    assert time.monotonic() - start < 1.0  # the requests did not wait for the status
    release.set()
    assert sender.wait_idle()
    statuses = [d for e, d in sent if e == STATUS_EVENT]
    assert 1 <= len(statuses) <= 2 and threads == {"xdit-status"}  # five requests, coalesced
    assert statuses[-1]["activity"]["outcome"] == "ok" and statuses[-1]["state"] == "running"
