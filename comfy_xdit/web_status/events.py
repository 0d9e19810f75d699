"""The websocket events: a tracker listener that forwards progress, errors and status payloads to
the browsers through ComfyUI's PromptServer.send_sync(event, data)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from .activity import ActivityTracker
from .gpu_memory import nvml_memory_used
from .labels import redact_tree
from .payload import status_payload

STATUS_EVENT = "xdit.status"
PROGRESS_EVENT = "xdit.progress"
ERROR_EVENT = "xdit.error"

log = logging.getLogger(__name__)


class EventSender:
    """A tracker listener that forwards to the browsers through send_sync(event, data):

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
            self.send_sync(event, redact_tree(data))
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
