"""What the nodes are doing: the running request (kind, model, step of total, per-rank progress),
the last error, and the last pool description seen. nodes.py runs every engine call through
ActivityTracker.run(); the sidebar reads snapshot() and last_error, and listeners forward both
to the browsers as they change."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from typing import Any, Callable

from .labels import file_name, root_cause

log = logging.getLogger(__name__)

# Exceptions that mean "stopped on purpose" (ComfyUI's interrupt, a cancelled request): no error toast.
_CANCEL_NAMES = {"InterruptProcessingException", "RequestCancelled", "KeyboardInterrupt"}


class ActivityTracker:
    """The request the nodes are running, the last error, and the last pool description seen.
    Thread-safe; listeners get ("progress", activity), ("error", error) and ("status", None) calls,
    outside the lock.

    The last error stays until a later request of the kind that failed succeeds: a sample's error
    until a sample succeeds, a load's until a load does; an error that came outside any request
    until any request succeeds. A workflow runs a load, a sample and a decode in turn, and the load
    that succeeds first must not hide that the sample after it failed last time. A cancelled request
    clears nothing."""

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
        """The running request ended ("ok" or "cancelled"); a success clears the last error it answers
        (see the class docstring)."""
        with self._lock:
            a = self._activity
            if a is None or not a["active"]:
                return
            a["active"], a["outcome"] = False, outcome
            a["elapsed"] = max(a["elapsed"] or 0.0, self._clock() - a["started"])
            self._cancel = None
            if outcome == "ok" and self._error is not None and self._error["kind"] in (None, a["kind"]):
                self._error = None
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
        if "on_progress" in kwargs:
            kwargs["on_progress"] = self._forwarding(kwargs["on_progress"])
        with self.track(getattr(fn, "__name__", "request"), model=getattr(handle, "path", None),
                        ranks=getattr(handle, "gpus", None), cancel=kwargs.get("cancel"),
                        stepped="on_progress" in kwargs):
            return fn(*args, **kwargs)

    def _forwarding(self, user_progress: Callable | None) -> Callable:
        """An on_progress that calls the node's own (which may raise: ComfyUI's interrupt, and the pool
        cancels) and then records the step."""
        def on_progress(progress: dict, preview=None):
            if user_progress is not None:
                user_progress(progress, preview)
            try:
                self.step(progress.get("step", 0), progress.get("total"), progress.get("elapsed"),
                          progress.get("ranks"))
            except Exception:  # odd progress data must never cancel a request
                log.exception("xDiT progress not tracked")
        return on_progress

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

    # the last pool description, shown while the pool is busy with a request
    def remember_status(self, raw: dict | None) -> None:
        with self._lock:
            self._status = raw

    def cached_status(self) -> dict | None:
        with self._lock:
            return self._status
