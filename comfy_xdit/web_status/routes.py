"""The HTTP routes of the sidebar tab (GET status, POST stop, POST unload) and their registration on
an aiohttp RouteTableDef. The engine blocks, so every handler runs it in a worker thread, and never
longer than the route's timeout."""

from __future__ import annotations

import asyncio
from typing import Callable

from .activity import ActivityTracker
from .gpu_memory import nvml_memory_used
from .labels import describe_model_key, redact_tree, root_cause
from .payload import status_payload


class PoolBusy(Exception):
    """The pool is running a request; an unload would have to wait for the whole of it."""


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
        return web.json_response(redact_tree(data), status=status, headers={"Cache-Control": "no-store"})

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
        """The file names of what was unloaded; PoolBusy rather than waiting for a running request."""
        with self.engine.hold_if_idle() as idle:
            if not idle:
                raise PoolBusy()
            keys = self.engine.unload()
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
