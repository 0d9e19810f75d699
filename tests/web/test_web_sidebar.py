"""The sidebar tab (web/xdit.js) in headless Chromium, driven by playwright-core from Node.

A local aiohttp server on 127.0.0.1 serves what ComfyUI's frontend gives an extension (stubs of
/scripts/app.js and /scripts/api.js, the websocket) with the pack's real routes over a fake pool.
The driver (sidebar_driver.cjs) checks that the tab renders the status, follows dispatched and
websocket events, toasts an error's root cause, and that its buttons POST to the routes.
Screenshots land in the test's tmp dir (and in $XDIT_WEB_ARTIFACTS where set).

Needs Chromium, Node.js and playwright-core (tests/web/install_browser.sh installs them); skipped
with the reason where one is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading

import pytest

from comfy_xdit.web_status import ActivityTracker, make_event_sender
from web_fakes import HERE, MODEL_PATH, SECRET_DIRS, VAE_PATH, FakeEngine, FakePool, StubServer, memory_probe

INSTALL_HINT = "run tests/web/install_browser.sh"


def _chromium() -> str | None:
    for candidate in (os.environ.get("XDIT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


def _node_with_playwright() -> tuple[str | None, str]:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        return None, f"Node.js is not installed ({INSTALL_HINT})"
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < 18:
        return None, f"Node.js {version} is too old for playwright-core (18 or newer; {INSTALL_HINT})"
    found = subprocess.run([node, "-e", "console.log(require.resolve('playwright-core'))"], cwd=HERE,
                           capture_output=True, text=True)
    if found.returncode != 0:
        return None, f"the Node package playwright-core is not installed ({INSTALL_HINT}, or set NODE_PATH)"
    return node, ""


@pytest.fixture
def browser_tools():
    chromium = _chromium()
    if chromium is None:
        pytest.skip(f"Chromium is not installed ({INSTALL_HINT}, or set XDIT_CHROMIUM)")
    node, why = _node_with_playwright()
    if node is None:
        pytest.skip(why)
    return chromium, node


DEATH = ("rank 1 (pid 4001) died; last error: rank 1: Traceback (most recent call last):\n"
         f'  File "/{SECRET_DIRS[0]}/{SECRET_DIRS[1]}/worker/handlers.py", line 212, in _vae\n'
         "    return {}, {\"images\": vae_loader.decode(vae, samples)}\n"
         "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB\n"
         "rank 0: Traceback (most recent call last):\nConnectionResetError: [Errno 104] Connection reset by peer")


def test_sidebar_tab_in_headless_chromium(browser_tools, tmp_path):
    chromium, node = browser_tools
    pool = FakePool()
    engine, tracker = FakeEngine(pool), ActivityTracker()
    server = StubServer(engine, tracker)
    tracker.add_listener(make_event_sender(server.send_sync, engine, tracker, memory_probe=memory_probe,
                                           min_interval=0))
    cancel = threading.Event()

    def begin(kind, total=None):
        tracker.begin(kind, model=MODEL_PATH if kind == "sample" else VAE_PATH, ranks=2, total=total,
                      cancel=cancel, stepped=kind == "sample")

    def fail(die=False):
        if die:
            pool.die(DEATH)
        tracker.fail(RuntimeError("xDiT worker pool: " + DEATH))

    server.controls.update(begin=begin, step=lambda step, total=None: tracker.step(step, total),
                           end=lambda: tracker.end(), fail=fail)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    url = server.start()
    try:
        env = dict(os.environ, XDIT_BASE_URL=url, XDIT_CHROMIUM=chromium, XDIT_OUT=str(shots),
                   XDIT_PROFILE=str(tmp_path / "profile"), XDIT_SECRET_DIRS=json.dumps(SECRET_DIRS))
        run = subprocess.run([node, os.path.join(HERE, "sidebar_driver.cjs")], cwd=HERE, env=env,
                             capture_output=True, text=True, timeout=180)
    finally:
        server.stop()
    artifacts = os.environ.get("XDIT_WEB_ARTIFACTS")
    if artifacts:
        shutil.copytree(shots, artifacts, dirs_exist_ok=True)
    print(run.stdout)
    print(f"screenshots: {shots}")
    result = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and result, f"driver failed (rc {run.returncode}):\n{run.stdout}\n{run.stderr}"
    assert json.loads(result[-1][len("RESULT "):])["ok"]

    # What the clicks did on the server side.
    assert server.count("POST", "/api/xdit/unload") == 1 and ("unload_model", {"model_key": None}) in pool.requests
    assert server.count("POST", "/api/xdit/stop") == 1 and pool.shutdowns == 1 and engine.current_pool() is None
    assert server.count("GET", "/api/xdit/status") == 3  # one per opening of the tab and one by the driver
    names = sorted(p.name for p in shots.iterdir())
    assert names == ["01-status.png", "02-progress-dispatched.png", "03-progress-websocket.png", "04-unloaded.png",
                     "05-error-toast.png", "06-stopped.png"]
    assert all((shots / n).stat().st_size > 5000 for n in names)
