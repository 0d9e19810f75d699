"""The worker pool as the browser sees it: the status payload, what the nodes are doing, the
websocket events, and the HTTP routes of the sidebar tab.

Nothing here imports ComfyUI. nodes.py registers the routes on PromptServer's route table
(an aiohttp RouteTableDef) and hands its send_sync to make_event_sender(); everything else
works on the Engine of client.py, or anything shaped like it.

What leaves this module never carries a file path: models, VAEs and LoRAs are named by their
file name, and every string of a payload has absolute directories stripped (error texts too).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import socket
import subprocess
import threading
import time
from typing import Any, Callable

STATUS_EVENT = "xdit.status"
PROGRESS_EVENT = "xdit.progress"
ERROR_EVENT = "xdit.error"

log = logging.getLogger(__name__)

# Exceptions that mean "stopped on purpose" (ComfyUI's interrupt, a cancelled request): no error toast.
_CANCEL_NAMES = {"InterruptProcessingException", "RequestCancelled", "KeyboardInterrupt"}
_DEGREE_LABELS = {"dp_degree": "data parallel", "cfg_degree": "CFG parallel", "pipefusion_degree": "PipeFusion",
                  "ring_degree": "Ring", "ulysses_degree": "Ulysses"}
# The directories of an absolute path (POSIX, ~/ or a Windows drive); what follows them is the file name.
_SEGMENT = r"[^\s\\/'\"|<>:](?:[^\n\\/'\"|<>:]*[^\s\\/'\"|<>:])?"  # may hold spaces, not at its ends
_ABS_DIRS = re.compile(r"(?<![\w.])(?:[A-Za-z]:[\\/]|~?[\\/])(?:" + _SEGMENT + r"[\\/])+")
_MAX_TEXT = 4000


# --- names, never paths ----------------------------------------------------------------------
def file_name(path: str) -> str:
    """The last component of a path, whatever its separators; "random:..." sources stay as they are."""
    return re.split(r"[\\/]", str(path).rstrip("\\/"))[-1]


def redact(text: str) -> str:
    """`text` with the directories of absolute paths removed, so only file names remain."""
    return _ABS_DIRS.sub("", str(text))


def _redact_tree(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_tree(v) for v in value]
    return value


def describe_model_key(key: str) -> dict:
    """A worker's cache key, turned into what may be shown.

    Transformers: "<source>|<dtype>|<attention kernel>|<layout>|compile=<bool>";
    VAEs: "vae|<path>|<dtype>". Anything else: the file name of the one field that looks like a path.
    """
    parts = str(key).split("|")
    if parts[0] == "vae" and len(parts) >= 3:
        return {"name": file_name("|".join(parts[1:-1])), "dtype": parts[-1]}
    if len(parts) >= 5 and parts[-1].startswith("compile="):
        return {"name": file_name("|".join(parts[:-4])), "dtype": parts[-4], "attention": parts[-3],
                "compiled": parts[-1] == "compile=True"}
    paths = [p for p in parts if "/" in p or "\\" in p]
    return {"name": file_name(paths[0] if paths else parts[0])}


def strategy_label(parallel: dict | None) -> str:
    """'Ulysses 2 x Ring 2' from a ParallelConfig dict; degrees of 1 left out."""
    used = [(k, v) for k, v in (parallel or {}).items() if isinstance(v, int) and v > 1]
    if not used:
        return "single rank"
    return " × ".join(f"{_DEGREE_LABELS.get(k, k.replace('_degree', ''))} {v}" for k, v in used)


# --- errors ----------------------------------------------------------------------------------
def _exception_line(text: str) -> str:
    """The last unindented line of a traceback ("RuntimeError: CUDA out of memory ..."), else the last line."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    for line in reversed(lines):
        if not line[0].isspace() and not line.startswith(("Traceback", "During handling", "The above exception")):
            return line.strip()
    return lines[-1].strip()


def root_cause(error: BaseException | str, kind: str | None = None) -> dict:
    """{summary, detail, message}: what went wrong in one line, the root cause, the whole text (redacted)."""
    if isinstance(error, BaseException):
        error = str(error) or type(error).__name__
    text = redact(str(error)).strip()
    text = re.sub(r"^xDiT worker pool:\s*", "", text)
    what = f"xDiT {kind} failed" if kind else "xDiT request failed"
    head, sep, tail = text.partition("; last error:")
    if sep:  # a rank (or the launcher) died; the rank that died first comes first
        blocks = [b for b in re.split(r"(?m)^(?=rank \d+: )", tail.strip()) if b.strip()]
        first = blocks[0] if blocks else tail
        label = re.match(r"(rank \d+): ", first)
        body = first[label.end():] if label else first
        cause = _exception_line(body) or head
        detail = f"{label.group(1)}: {cause}" if label else cause
        summary = f"{what}: {head.strip()}"
    else:
        detail = _exception_line(text) if "Traceback" in text else (text.splitlines() or [""])[0]
        summary = what
    message = text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + " …"
    return {"summary": summary[:300], "detail": detail[:1000], "message": message}


# --- what the nodes are doing ----------------------------------------------------------------
class ActivityTracker:
    """The request the nodes are running (kind, model, step of total, per-rank progress), the last
    error, and the last pool description seen. Thread-safe; listeners get ("progress", activity),
    ("error", error) and ("status", None) calls, outside the lock."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._listeners: list[Callable[[str, Any], None]] = []
        self._activity: dict | None = None
        self._cancel: threading.Event | None = None
        self._error: dict | None = None
        self._status: dict | None = None

    # listeners
    def add_listener(self, fn: Callable[[str, Any], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[str, Any], None]) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _emit(self, kind: str, data: Any) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(kind, data)
            except Exception:  # a broken listener must never fail a node
                log.exception("xDiT status listener failed")

    def notify_status(self) -> None:
        """Tell the listeners that the pool changed (loaded, unloaded, stopped)."""
        self._emit("status", None)

    # activity
    def begin(self, kind: str, *, model: str | None = None, ranks: int | None = None, total: int | None = None,
              cancel: threading.Event | None = None, stepped: bool = False) -> int:
        """A request starts; `stepped`: it will report steps (its total may come with the first one)."""
        with self._lock:
            request_id = next(self._ids)
            self._activity = dict(id=request_id, kind=kind, model=file_name(model) if model else None,
                                  nranks=int(ranks) if ranks else None, step=0 if total or stepped else None,
                                  total=total,
                                  elapsed=0.0, started=self._clock(), active=True, outcome=None, rank_steps=None)
            self._cancel = cancel
        self._emit("progress", self.snapshot())
        return request_id

    def step(self, step: int, total: int | None = None, elapsed: float | None = None,
             ranks: list | None = None) -> None:
        """Progress of the running request; `ranks` (optional): one step per rank where they differ."""
        with self._lock:
            a = self._activity
            if a is None or not a["active"]:
                return
            a["step"], a["total"] = int(step), int(total) if total is not None else a["total"]
            a["elapsed"] = float(elapsed) if elapsed is not None else self._clock() - a["started"]
            if ranks is not None:
                a["rank_steps"] = [int(s) for s in ranks]
        self._emit("progress", self.snapshot())

    def end(self, outcome: str = "ok") -> None:
        with self._lock:
            a = self._activity
            if a is None or not a["active"]:
                return
            a["active"], a["outcome"] = False, outcome
            a["elapsed"] = max(a["elapsed"] or 0.0, self._clock() - a["started"])
            self._cancel = None
        self._emit("progress", self.snapshot())
        self._emit("status", None)

    def fail(self, error: BaseException | str) -> dict:
        """Record an error (root cause first) and end the running request with it."""
        with self._lock:
            a = self._activity
            kind = a["kind"] if a is not None and a["active"] else None
            err = dict(root_cause(error, kind), kind=kind, model=a["model"] if kind else None, time=self._clock())
            self._error = err
            if kind:
                a["active"], a["outcome"] = False, "error"
                a["elapsed"] = self._clock() - a["started"]
                self._cancel = None
        if kind:
            self._emit("progress", self.snapshot())
        self._emit("error", dict(err))
        self._emit("status", None)
        return err

    def cancel_current(self) -> bool:
        """Ask the running request to stop at its next step (where the node handed over its cancel event)."""
        with self._lock:
            cancel = self._cancel
        if cancel is None:
            return False
        cancel.set()
        return True

    @contextlib.contextmanager
    def track(self, kind: str, **begin_args):
        self.begin(kind, **begin_args)
        try:
            yield self
        except BaseException as e:
            if type(e).__name__ in _CANCEL_NAMES or getattr(e, "kind", None) == "cancelled":
                self.end("cancelled")
            else:
                self.fail(e)
            raise
        else:
            self.end("ok")

    def run(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) as one tracked request: kind from fn's name (load, sample, decode...),
        model and rank count from the handle passed first, steps from its on_progress."""
        handle = args[0] if args else None
        user_progress = kwargs.get("on_progress")
        if "on_progress" in kwargs:
            def on_progress(progress: dict, preview=None):
                if user_progress is not None:
                    user_progress(progress, preview)  # may raise (ComfyUI's interrupt): the pool cancels
                try:
                    self.step(progress.get("step", 0), progress.get("total"), progress.get("elapsed"),
                              progress.get("ranks"))
                except Exception:  # odd progress data must never cancel a request
                    log.exception("xDiT progress not tracked")
            kwargs["on_progress"] = on_progress
        with self.track(getattr(fn, "__name__", "request"), model=getattr(handle, "path", None),
                        ranks=getattr(handle, "gpus", None), cancel=kwargs.get("cancel"),
                        stepped="on_progress" in kwargs):
            return fn(*args, **kwargs)

    def snapshot(self) -> dict | None:
        with self._lock:
            a = None if self._activity is None else dict(self._activity)
        if a is None:
            return None
        step, total, elapsed = a["step"], a["total"], a["elapsed"]
        if a["active"] and not (total and step):
            elapsed = self._clock() - a["started"]
        eta = elapsed / step * (total - step) if a["active"] and total and step else None
        rank_steps = a.pop("rank_steps")
        ranks = []
        for r in range(a.pop("nranks") or 0):
            s = rank_steps[r] if rank_steps and r < len(rank_steps) else step
            ranks.append(dict(rank=r, step=s, total=total, active=a["active"]))
        return dict(a, elapsed=round(elapsed, 3), eta=None if eta is None else round(eta, 3), ranks=ranks)

    @property
    def last_error(self) -> dict | None:
        with self._lock:
            return None if self._error is None else dict(self._error)

    def clear_error(self) -> None:
        with self._lock:
            self._error = None

    # the last pool description, shown while the pool is busy with a request
    def remember_status(self, raw: dict | None) -> None:
        with self._lock:
            self._status = raw

    def cached_status(self) -> dict | None:
        with self._lock:
            return self._status


# --- GPU memory --------------------------------------------------------------------------------
_nvml_state: dict = {}


def _memory_by_pid_nvml() -> dict[int, int] | None:
    """{pid: bytes} of every compute process on this machine's GPUs through NVML (nvidia-ml-py);
    None where NVML cannot be used."""
    if _nvml_state.get("broken"):
        return None
    try:
        import pynvml
        if not _nvml_state.get("init"):
            pynvml.nvmlInit()
            _nvml_state["init"] = True
        by_pid: dict[int, int] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
                by_pid[proc.pid] = by_pid.get(proc.pid, 0) + (proc.usedGpuMemory or 0)
        return by_pid
    except Exception:  # not installed, no driver, no permission
        _nvml_state["broken"] = True
        return None


def _memory_by_pid_smi() -> dict[int, int] | None:
    """The same through nvidia-smi, which comes with the driver; None where it is missing or fails."""
    if _nvml_state.get("smi_broken"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        _nvml_state["smi_broken"] = True
        return None
    if out.returncode != 0:
        return None
    by_pid: dict[int, int] = {}
    for line in out.stdout.splitlines():
        try:
            pid, mib = (int(x) for x in line.split(","))
        except ValueError:
            continue
        by_pid[pid] = by_pid.get(pid, 0) + mib * 2 ** 20
    return by_pid


def nvml_memory_used(ranks: list[dict]) -> dict[int, int]:
    """{rank: bytes of GPU memory its process holds}, for the CUDA ranks on this machine: through NVML
    where nvidia-ml-py is installed, else nvidia-smi; {} where neither answers (memory unknown)."""
    local = [r for r in ranks if r.get("host") in (None, socket.gethostname()) and r.get("pid")
             and str(r.get("device", "cuda")).startswith("cuda")]
    if not local:
        return {}
    by_pid = _memory_by_pid_nvml()
    if by_pid is None:
        by_pid = _memory_by_pid_smi() or {}
    return {r["rank"]: by_pid[r["pid"]] for r in local if r["pid"] in by_pid}


# --- the status payload --------------------------------------------------------------------------
_MISSING = object()


@contextlib.contextmanager
def _idle(engine, pool):
    """True with the engine's and the pool's locks held where neither is busy, else False at once.

    Never waits: a pool runs one request at a time and a status or unload would queue behind a
    whole sampling run. Engine before pool, the order Engine itself takes them."""
    held = []
    try:
        for lock in (getattr(engine, "_lock", None), getattr(pool, "_lock", None)):
            if lock is None:
                continue
            if not lock.acquire(blocking=False):
                yield False
                return
            held.append(lock)
        yield True
    finally:
        for lock in reversed(held):
            lock.release()


def _query(engine, tracker: ActivityTracker | None) -> tuple[str, dict | None, bool, str | None]:
    """(state, raw description, stale, reason) without ever waiting for a running request."""
    pool = getattr(engine, "_pool", _MISSING)
    if pool is _MISSING:  # an engine that keeps its pool to itself: ask it
        raw = engine.status()
        return ("running" if raw else "stopped"), raw, False, None
    if pool is None:
        return "stopped", None, False, None
    if not pool.alive:
        reason = getattr(pool, "_death_reason", "") or ""
        if reason or (tracker is not None and tracker.last_error is not None):
            return "failed", None, False, reason or None
        return "stopped", None, False, None
    with _idle(engine, pool) as idle:
        if idle:
            try:
                raw = engine.status()
            except Exception as e:  # the pool died under the request
                return "failed", None, False, str(e)
            if raw is None:
                return _query(engine, tracker) if not pool.alive else ("stopped", None, False, None)
            if tracker is not None:
                tracker.remember_status(raw)
            return "running", raw, False, None
    cached = tracker.cached_status() if tracker is not None else None
    return "running", cached or getattr(pool, "info", None) or None, True, None


def status_payload(engine, tracker: ActivityTracker | None = None, *,
                   memory_probe: Callable[[list], dict] | None = nvml_memory_used) -> dict:
    """Everything the sidebar shows. state: "stopped" (no pool), "running", "failed" (the pool died,
    or would not start). Blocking (a short round trip to rank 0 where the pool is idle): call it
    from a thread, not from the event loop."""
    state, raw, stale, reason = _query(engine, tracker)
    raw = raw or {}
    pool = getattr(engine, "_pool", None)
    options = getattr(pool, "options", None)
    activity = tracker.snapshot() if tracker is not None else None
    running = bool(activity and activity["active"])
    progress = {r["rank"]: r for r in activity["ranks"]} if running else {}

    ranks_raw = [r for r in raw.get("ranks") or [] if isinstance(r, dict)]
    memory = {}
    if state == "running" and memory_probe is not None:
        try:
            memory = memory_probe(ranks_raw) or {}
        except Exception:
            memory = {}
    ranks = []
    for r in ranks_raw:
        n = r.get("rank")
        # what the worker process holds: NVML's count (with its CUDA context), else its allocator's reserve
        used = r.get("memory_used", memory.get(n, r.get("memory_reserved")))
        ranks.append(dict(rank=n, host=r.get("host"), pid=r.get("pid"), device=r.get("device"),
                          gpu=r.get("device_name"), gpu_index=r.get("gpu_index"), memory_total=r.get("memory_total"),
                          memory_used=used, memory_free=r.get("memory_free"),
                          memory_allocated=r.get("memory_allocated"), memory_reserved=r.get("memory_reserved"),
                          progress=progress.get(n)))

    models = []
    for m in raw.get("models") or []:
        info = describe_model_key(m.get("key", ""))
        parallel = m.get("parallel") or {}
        models.append(dict(info, variant=m.get("variant"), strategy=strategy_label(parallel),
                           degrees={k: v for k, v in parallel.items() if isinstance(v, int)},
                           loras=[dict(name=file_name(lora[0]), strength=lora[1]) for lora in m.get("loras") or []
                                  if isinstance(lora, (list, tuple)) and len(lora) == 2]))
    vaes = [describe_model_key(k) for k in raw.get("vaes") or []]

    payload = dict(
        state=state,
        busy=running,
        stale=stale,
        device=raw.get("device") or getattr(options, "device", None),
        world_size=raw.get("world_size") or (len(ranks) or getattr(options, "nproc", None)),
        gpus_requested=getattr(options, "nproc", None),
        ranks=ranks,
        models=models,
        vaes=vaes,
        strategy=models[0]["strategy"] if models else None,
        degrees=models[0]["degrees"] if models else None,
        activity=activity,
        error=tracker.last_error if tracker is not None else None,
        reason=root_cause(reason)["detail"] if reason else None,
        time=time.time(),
    )
    return _redact_tree(payload)


# --- websocket events ------------------------------------------------------------------------------
class EventSender:
    """A tracker listener that forwards to the browsers through ComfyUI's send_sync(event, data):

    "xdit.progress" {activity}    on each step (at most one per `min_interval` s; the latest always arrives)
    "xdit.error"    {summary, detail, message, kind, model, time}
    "xdit.status"   status_payload(...) when the pool changed (after each request, stop, unload)
    """

    def __init__(self, send_sync: Callable[[str, Any], None], engine=None, tracker: ActivityTracker | None = None,
                 *, memory_probe: Callable[[list], dict] | None = nvml_memory_used, min_interval: float = 0.1,
                 background: bool = True):
        self.send_sync, self.engine, self.tracker = send_sync, engine, tracker
        self.memory_probe, self.min_interval = memory_probe, min_interval
        self.background = background  # build status payloads in a thread of ours, not the node's
        self._lock = threading.Lock()
        self._status_wanted = False
        self._status_thread: threading.Thread | None = None
        self._last_progress = float("-inf")
        self._held: dict | None = None     # the latest progress not sent yet (throttled)
        self._timer: threading.Timer | None = None

    def _send(self, event: str, data: Any) -> None:
        try:
            self.send_sync(event, _redact_tree(data))
        except Exception:  # no browser, server shutting down: never fail a node for it
            log.exception("cannot send %s", event)

    def progress(self, activity: dict | None) -> None:
        """Sent at once where the last one is `min_interval` old (and always the first and last step
        and the end); otherwise held, and the latest held one sent when the interval is over."""
        final = activity is None or not activity.get("active") or activity.get("step") in (0, activity.get("total"))
        with self._lock:
            wait = self._last_progress + self.min_interval - time.monotonic()
            if not final and wait > 0:
                self._held = activity
                if self._timer is None:
                    self._timer = threading.Timer(wait, self._flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._held = None
            self._last_progress = time.monotonic()
        self._send(PROGRESS_EVENT, {"activity": activity})

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            activity, self._held = self._held, None
            if activity is None:
                return
            self._last_progress = time.monotonic()
        self._send(PROGRESS_EVENT, {"activity": activity})

    def error(self, error: dict) -> None:
        self._send(ERROR_EVENT, error)

    def status(self, payload: dict | None = None) -> None:
        """Send `payload`, or a fresh status_payload() of the engine: built in a background thread
        (a round trip to rank 0 and a GPU memory query the node need not wait for), requests made
        while one is being built coalescing into one more."""
        if payload is not None:
            self._send(STATUS_EVENT, payload)
            return
        if self.engine is None:
            return
        if not self.background:
            self._send_status()
            return
        with self._lock:
            self._status_wanted = True
            if self._status_thread is not None:
                return
            self._status_thread = threading.Thread(target=self._status_loop, daemon=True, name="xdit-status")
            self._status_thread.start()

    def _status_loop(self) -> None:
        while True:
            with self._lock:
                if not self._status_wanted:
                    self._status_thread = None
                    return
                self._status_wanted = False
            self._send_status()

    def _send_status(self) -> None:
        try:
            payload = status_payload(self.engine, self.tracker, memory_probe=self.memory_probe)
        except Exception:
            log.exception("cannot build the xDiT status")
            return
        self._send(STATUS_EVENT, payload)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once no status is being built (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._status_thread is None:
                    return True
            time.sleep(0.01)
        return False

    def __call__(self, kind: str, data: Any) -> None:
        if kind == "progress":
            self.progress(data)
        elif kind == "error":
            self.error(data)
        elif kind == "status":
            self.status(data)


def make_event_sender(send_sync: Callable[[str, Any], None], engine=None, tracker: ActivityTracker | None = None,
                      **options) -> EventSender:
    """An EventSender over send_sync; pass it to tracker.add_listener()."""
    return EventSender(send_sync, engine, tracker, **options)


# --- HTTP routes -------------------------------------------------------------------------------------
class PoolBusy(Exception):
    pass


class StatusRoutes:
    """aiohttp handlers over an engine: GET status, POST stop, POST unload."""

    def __init__(self, engine, tracker: ActivityTracker | None = None, *,
                 memory_probe: Callable[[list], dict] | None = nvml_memory_used, timeout: float = 30.0):
        self.engine = engine
        self.tracker = tracker if tracker is not None else ActivityTracker()
        self.memory_probe = memory_probe
        self.timeout = timeout

    def payload(self) -> dict:
        return status_payload(self.engine, self.tracker, memory_probe=self.memory_probe)

    async def _in_thread(self, fn: Callable, *args):
        """fn in a worker thread (the engine blocks); raises asyncio.TimeoutError after self.timeout."""
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        return await asyncio.wait_for(asyncio.shield(future), self.timeout)

    @staticmethod
    def _json(data: dict, status: int = 200):
        from aiohttp import web
        return web.json_response(_redact_tree(data), status=status, headers={"Cache-Control": "no-store"})

    async def status(self, request):
        try:
            return self._json(await self._in_thread(self.payload))
        except asyncio.TimeoutError:
            return self._json({"ok": False, "error": "the pool did not answer in time"}, status=504)

    def _stop(self) -> None:
        self.engine.shutdown()
        self.tracker.remember_status(None)
        self.tracker.notify_status()

    async def stop(self, request):
        cancelled = self.tracker.cancel_current()  # a sampling run stops at its next step
        try:
            await self._in_thread(self._stop)
        except asyncio.TimeoutError:
            return self._json({"ok": True, "pending": True, "cancelled": cancelled,
                               "message": "the pool stops when its current request ends"}, status=202)
        return self._json({"ok": True, "cancelled": cancelled, "status": await self._in_thread(self.payload)})

    def _unload(self) -> list[str]:
        if callable(getattr(self.engine, "unload", None)):
            keys = self.engine.unload() or []
        else:
            pool = getattr(self.engine, "_pool", None)
            if pool is None or not pool.alive:
                return []
            with _idle(self.engine, pool) as idle:
                if not idle:
                    raise PoolBusy()
                keys = pool.request("unload_model", {"model_key": None})[0].get("unloaded", [])
        self.tracker.remember_status(None)
        self.tracker.notify_status()
        return [describe_model_key(k)["name"] for k in keys]

    async def unload(self, request):
        try:
            names = await self._in_thread(self._unload)
        except PoolBusy:
            return self._json({"ok": False, "error": "the pool is busy with a request; unload models when it "
                                                     "finishes, or stop the pool"}, status=409)
        except asyncio.TimeoutError:
            return self._json({"ok": False, "error": "the pool did not answer in time"}, status=504)
        except Exception as e:
            err = root_cause(e, "unload")
            return self._json({"ok": False, "error": err["detail"] or err["summary"]}, status=500)
        return self._json({"ok": True, "unloaded": names, "status": await self._in_thread(self.payload)})


def register_routes(routes, engine, tracker: ActivityTracker | None = None, *, prefix: str = "/xdit",
                    **options) -> StatusRoutes:
    """Add GET {prefix}/status, POST {prefix}/stop and POST {prefix}/unload to an aiohttp RouteTableDef
    (ComfyUI's PromptServer.instance.routes is one, and serves each under /api too). Other methods
    on those paths get 405."""
    handlers = StatusRoutes(engine, tracker, **options)
    for method, path, handler in (("GET", "/status", handlers.status), ("POST", "/stop", handlers.stop),
                                  ("POST", "/unload", handlers.unload)):
        routes.route(method, prefix + path)(handler)
        # Any other method: 405 here, not a 404 from a static route further down ComfyUI's router.
        routes.route("*", prefix + path)(_not_allowed(method))
    return handlers


def _not_allowed(allowed: str):
    async def not_allowed(request):
        from aiohttp import web
        raise web.HTTPMethodNotAllowed(request.method, [allowed])
    return not_allowed


__all__ = ["ERROR_EVENT", "PROGRESS_EVENT", "STATUS_EVENT", "ActivityTracker", "EventSender", "StatusRoutes",
           "describe_model_key", "file_name", "make_event_sender", "nvml_memory_used", "redact", "register_routes",
           "root_cause", "status_payload", "strategy_label"]
