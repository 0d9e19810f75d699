"""A stand-in worker pool for the web tests, and the test server that mirrors how ComfyUI serves
the pack: routes on a RouteTableDef (again under /api), the web folder under /extensions/comfy_xdit,
/scripts/app.js and /scripts/api.js (stubs here), and a websocket that carries send_sync's events."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import threading
import types

from aiohttp import WSMsgType, web

from comfy_xdit.web_status import register_routes

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
STUB_DIR = os.path.join(HERE, "stub")
WEB_DIR = os.path.join(REPO_ROOT, "web")

# Directory names that must never reach a browser.
SECRET_DIRS = ("srv-models-vault", "team-checkpoints", "lora-private-dir", "vae-store")
MODEL_PATH = f"/{SECRET_DIRS[0]}/{SECRET_DIRS[1]}/flux1-dev.safetensors"
LORA_PATH = f"/{SECRET_DIRS[0]}/{SECRET_DIRS[2]}/style-lora.safetensors"
VAE_PATH = f"/{SECRET_DIRS[0]}/{SECRET_DIRS[3]}/ae.safetensors"
GIB = 2 ** 30


def describe(nranks: int = 2, models: bool = True) -> dict:
    """What worker/handlers.py describe() answers, file paths and all."""
    ranks = [dict(rank=r, pid=4000 + r, host="gpu-node-1", device=f"cuda:{r}", device_name="NVIDIA H100 80GB HBM3",
                  gpu_index=2 + r, memory_total=80 * GIB, memory_free=(42 - 2 * r) * GIB,
                  memory_allocated=(18 + 2 * r) * GIB, memory_reserved=(19 + 2 * r) * GIB) for r in range(nranks)]
    key = f"{MODEL_PATH}|bf16|default|ring_degree=1,ulysses_degree={nranks}|compile=False"
    return dict(world_size=nranks, device="cuda", ranks=ranks,
                models=[dict(key=key, parallel=dict(dp_degree=1, cfg_degree=1, pipefusion_degree=1, ring_degree=1,
                                                    ulysses_degree=nranks),
                             variant="dev", loras=[[LORA_PATH, 0.8]])] if models else [],
                vaes=[f"vae|{VAE_PATH}|fp32"] if models else [])


class FakePool:
    """Shaped like comfy_xdit.pool.controller.WorkerPool, as far as FakeEngine and the routes use it."""

    def __init__(self, nranks: int = 2):
        self.options = types.SimpleNamespace(nproc=nranks, device="cuda")
        self._lock = threading.RLock()
        self.death_reason = ""
        self.alive = True
        self.loaded = True
        self.info = describe(nranks, models=False)
        self.requests: list[tuple[str, dict]] = []
        self.shutdowns = 0

    @contextlib.contextmanager
    def hold_if_idle(self):
        if not self._lock.acquire(blocking=False):
            yield False
            return
        try:
            yield True
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def running(self):
        """Held as a running request holds the real pool, for the length of the block."""
        with self._lock:
            yield

    def request(self, kind, args=None, tensors=None, **_):
        with self._lock:
            self.requests.append((kind, dict(args or {})))
            if kind == "status":
                return describe(self.options.nproc, models=self.loaded), {}
            if kind == "unload_model":
                raw = describe(self.options.nproc, models=self.loaded)
                keys = [m["key"] for m in raw["models"]] + raw["vaes"]
                self.loaded = False
                return {"unloaded": keys}, {}
            raise AssertionError(f"unexpected request {kind}")

    def shutdown(self, timeout: float = 10.0):
        with self._lock:
            self.shutdowns += 1
            self.alive = False

    def die(self, reason: str):
        self.alive = False
        self.death_reason = reason


class FakeEngine:
    """Shaped like comfy_xdit.client.Engine as far as the routes use it (its public accessors), over
    a FakePool or none."""

    def __init__(self, pool: FakePool | None = None):
        self._pool = pool
        self._lock = threading.RLock()

    def current_pool(self) -> FakePool | None:
        return self._pool

    @contextlib.contextmanager
    def hold_if_idle(self):
        if not self._lock.acquire(blocking=False):
            yield False
            return
        try:
            if self._pool is None:
                yield True
            else:
                with self._pool.hold_if_idle() as idle:
                    yield idle
        finally:
            self._lock.release()

    def status(self) -> dict | None:
        with self._lock:
            if self._pool is None or not self._pool.alive:
                return None
            return self._pool.request("status")[0]

    def unload(self) -> list[str]:
        with self._lock:
            if self._pool is None or not self._pool.alive:
                return []
            return self._pool.request("unload_model", {"model_key": None})[0].get("unloaded", [])

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None


def memory_probe(ranks):
    return {r["rank"]: (20 + 2 * r["rank"]) * GIB for r in ranks}


def comfy_like_app(routes: web.RouteTableDef, middlewares=(), more_routes=None) -> web.Application:
    """The routes as PromptServer.add_routes() serves them: each also under /api, and last of all
    the frontend's files at "/" (a static route that answers GET on any path)."""
    app = web.Application(middlewares=list(middlewares))
    api_routes = web.RouteTableDef()
    for route in routes:
        if isinstance(route, web.RouteDef):
            api_routes.route(route.method, "/api" + route.path)(route.handler, **route.kwargs)
    app.add_routes(api_routes)
    app.add_routes(routes)
    if more_routes is not None:
        more_routes(app)
    app.router.add_static("/", STUB_DIR)
    return app


class StubServer:
    """The stub frontend and the pack's routes on 127.0.0.1, in a thread with its own event loop.

    send_sync(event, data) reaches every open websocket, as PromptServer.send_sync does.
    `log` lists (method, path) of every request; `control` actions run on the tracker from a
    worker thread (POST /test/<action>), so a browser test can make the server emit events."""

    def __init__(self, engine, tracker, **route_options):
        self.engine, self.tracker = engine, tracker
        self.log: list[tuple[str, str]] = []
        self.sockets: set = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="stub-server")
        routes = web.RouteTableDef()
        register_routes(routes, engine, tracker, memory_probe=memory_probe, **route_options)
        self.app = comfy_like_app(routes, middlewares=[self._record], more_routes=self._routes)
        self.controls = {}

    def _routes(self, app):
        app.router.add_get("/", self._index)
        app.router.add_get("/ws", self._ws)
        app.router.add_post("/test/{action}", self._control)
        app.router.add_get("/test-log", self._log)
        app.router.add_get("/api/extensions", self._extensions)
        app.router.add_static("/extensions/comfy_xdit", WEB_DIR)

    @web.middleware
    async def _record(self, request, handler):
        self.log.append((request.method, request.path))
        return await handler(request)

    async def _index(self, request):
        return web.FileResponse(os.path.join(STUB_DIR, "index.html"))

    async def _log(self, request):
        return web.json_response(self.log)

    async def _extensions(self, request):  # as ComfyUI lists a pack's WEB_DIRECTORY
        files = sorted(glob.glob(os.path.join(WEB_DIR, "**", "*.js"), recursive=True))
        return web.json_response(["/extensions/comfy_xdit/" + os.path.relpath(f, WEB_DIR).replace(os.sep, "/")
                                  for f in files])

    async def _ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.sockets.discard(ws)
        return ws

    async def _control(self, request):
        action = self.controls[request.match_info["action"]]
        args = await request.json() if request.can_read_body else {}
        await asyncio.get_running_loop().run_in_executor(None, lambda: action(**args))
        return web.json_response({"ok": True})

    def send_sync(self, event, data, sid=None):
        message = json.dumps({"type": event, "data": data})

        async def broadcast():
            for ws in list(self.sockets):
                await ws.send_str(message)

        asyncio.run_coroutine_threadsafe(broadcast(), self.loop)

    def start(self) -> str:
        self._thread.start()

        async def up():
            self.runner = web.AppRunner(self.app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            return site._server.sockets[0].getsockname()[1]

        port = asyncio.run_coroutine_threadsafe(up(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self):
        async def down():
            for ws in list(self.sockets):
                await ws.close()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p in self.log if m == method and p == path)
