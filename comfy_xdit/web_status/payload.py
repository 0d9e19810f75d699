"""The status payload: everything the sidebar shows about the pool, built from the engine's public
accessors (current_pool, hold_if_idle, status) and the tracker, without ever waiting for a running
request and without ever starting a pool."""

from __future__ import annotations

import time
from typing import Callable

from .activity import ActivityTracker
from .gpu_memory import nvml_memory_used
from .labels import describe_model_key, file_name, redact_tree, root_cause, strategy_label


def _not_running(pool, tracker: ActivityTracker | None) -> tuple[str, dict | None, bool, str | None]:
    """A pool that is not alive: "failed" where it died (or a request failed), else "stopped"."""
    reason = pool.death_reason if pool is not None else ""
    if pool is not None and (reason or (tracker is not None and tracker.last_error is not None)):
        return "failed", None, False, reason or None
    return "stopped", None, False, None


def _query(engine, tracker: ActivityTracker | None) -> tuple[str, dict | None, bool, str | None]:
    """(state, raw description, stale, reason). A fresh description from rank 0 where the pool is idle;
    while a request runs (a status would queue behind a whole sampling run) the last one seen, stale."""
    pool = engine.current_pool()
    if pool is None or not pool.alive:
        return _not_running(pool, tracker)
    with engine.hold_if_idle() as idle:
        if idle:
            try:
                raw = engine.status()
            except Exception as e:  # the pool died under the request
                return "failed", None, False, str(e)
            if raw is None:  # it died or stopped just now
                return _not_running(engine.current_pool(), tracker)
            if tracker is not None:
                tracker.remember_status(raw)
            return "running", raw, False, None
    cached = tracker.cached_status() if tracker is not None else None
    return "running", cached or pool.info or None, True, None


def _memory(state: str, ranks_raw: list[dict], memory_probe: Callable[[list], dict] | None) -> dict:
    """{rank: bytes} from the probe for a running pool; {} where there is none or it fails."""
    if state != "running" or memory_probe is None:
        return {}
    try:
        return memory_probe(ranks_raw) or {}
    except Exception:  # memory is shown as unknown, the rest of the status still matters
        return {}


def _ranks(ranks_raw: list[dict], memory: dict, progress: dict) -> list[dict]:
    """One entry per rank. memory_used: what the worker process holds, NVML's count (with its CUDA
    context) where known, else its allocator's reserve."""
    ranks = []
    for r in ranks_raw:
        n = r.get("rank")
        used = r.get("memory_used", memory.get(n, r.get("memory_reserved")))
        ranks.append(dict(rank=n, host=r.get("host"), pid=r.get("pid"), device=r.get("device"),
                          gpu=r.get("device_name"), gpu_index=r.get("gpu_index"), memory_total=r.get("memory_total"),
                          memory_used=used, memory_free=r.get("memory_free"),
                          memory_allocated=r.get("memory_allocated"), memory_reserved=r.get("memory_reserved"),
                          progress=progress.get(n)))
    return ranks


def _models(raw: dict) -> list[dict]:
    """The resident transformers by file name, with their layout and LoRAs."""
    models = []
    for m in raw.get("models") or []:
        parallel = m.get("parallel") or {}
        models.append(dict(describe_model_key(m.get("key", "")), variant=m.get("variant"),
                           strategy=strategy_label(parallel),
                           degrees={k: v for k, v in parallel.items() if isinstance(v, int)},
                           loras=[dict(name=file_name(lora[0]), strength=lora[1]) for lora in m.get("loras") or []
                                  if isinstance(lora, (list, tuple)) and len(lora) == 2]))
    return models


def status_payload(engine, tracker: ActivityTracker | None = None, *,
                   memory_probe: Callable[[list], dict] | None = nvml_memory_used) -> dict:
    """Everything the sidebar shows. state: "stopped" (no pool), "running", "failed" (the pool died,
    or would not start). Blocking (a short round trip to rank 0 where the pool is idle): call it
    from a thread, not from the event loop."""
    state, raw, stale, reason = _query(engine, tracker)
    raw = raw or {}
    pool = engine.current_pool()
    options = pool.options if pool is not None else None
    activity = tracker.snapshot() if tracker is not None else None
    running = bool(activity and activity["active"])
    progress = {r["rank"]: r for r in activity["ranks"]} if running else {}
    ranks_raw = [r for r in raw.get("ranks") or [] if isinstance(r, dict)]
    ranks = _ranks(ranks_raw, _memory(state, ranks_raw, memory_probe), progress)
    models = _models(raw)
    payload = dict(
        state=state,
        busy=running,
        stale=stale,
        device=raw.get("device") or getattr(options, "device", None),
        world_size=raw.get("world_size") or (len(ranks) or getattr(options, "nproc", None)),
        gpus_requested=getattr(options, "nproc", None),
        ranks=ranks,
        models=models,
        vaes=[describe_model_key(k) for k in raw.get("vaes") or []],
        strategy=models[0]["strategy"] if models else None,
        degrees=models[0]["degrees"] if models else None,
        activity=activity,
        error=tracker.last_error if tracker is not None else None,
        reason=root_cause(reason)["detail"] if reason else None,
        time=time.time(),
    )
    return redact_tree(payload)
