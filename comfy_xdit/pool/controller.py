"""Controller side of the worker pool: spawn, handshake, monitor, requests, shutdown.

Runs inside the ComfyUI process (or a test, or the benchmark). The pool is torchrun with
one rank per GPU; rank 0 answers on a private Unix socket. Nothing here imports ComfyUI.

Each pool lives in a private temp directory (cxd-pool-*: the socket, the launcher's log, the
ranks' pid and error files) that names the controller owning it (OWNER_FILE). A shutdown
removes it; where the controller is killed (SIGTERM, SIGKILL) rank 0 removes it as the ranks
exit, and the next pool start of any controller sweeps what is still left (see sweep_stale_dirs).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .protocol import REPLY_TYPES, Channel, connect, make_private_dir, new_pool_id, new_secret, sweep_segments

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Settings of the host process that must not leak into the workers by accident.
_SCRUBBED_ENV = ("CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "RANK", "WORLD_SIZE",
                 "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
POOL_DIR_PREFIX = "cxd-pool-"
# In each pool directory: "<pid> <start time>" of the controller that made it (see _process_start).
OWNER_FILE = "controller.pid"
# A pool directory without an owner file (made by an older version, or its controller died before
# writing it) is swept once it is this old and none of its ranks lives.
STALE_AFTER_S = 3600.0


class PoolError(RuntimeError):
    pass


class PoolStartError(PoolError):
    pass


class PoolDied(PoolError):
    pass


class RequestFailed(PoolError):
    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind


class RequestCancelled(RequestFailed):
    pass


class DeadlineExceeded(PoolError):
    pass


@dataclass
class PoolOptions:
    nproc: int = 1                      # ranks on this machine (one per GPU)
    device: str = "cpu"                 # "cuda" or "cpu" (gloo, for tests and the demo)
    gpus: list[int] | None = None       # physical GPU indices; None = the first nproc
    python: str = sys.executable
    start_timeout: float = 300.0
    deadline_grace: float = 10.0        # after a deadline, how long ranks get to stop by themselves
    nnodes: int = 1                     # >1: other machines join with `python -m worker.join`
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)


ProgressFn = Callable[[dict, "torch.Tensor | None"], None]


class WorkerPool:
    def __init__(self, options: PoolOptions | None = None):
        self.options = options or PoolOptions()
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen | None = None
        self._channel: Channel | None = None
        self._dead = threading.Event()
        self._death_reason = ""
        self.info: dict = {}
        self.starts = 0
        self._loads: dict[str, dict] = {}    # model_key -> load args, replayed after a restart
        self._loaded: set[str] = set()       # model keys resident in the current pool
        atexit.register(self.shutdown)

    # --- lifecycle -----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._dead.is_set()

    @property
    def death_reason(self) -> str:
        """Why the pool died ("rank 1 (pid 4001) died; last error: ..."), "" where it did not (it runs,
        or was shut down)."""
        return self._death_reason

    @contextlib.contextmanager
    def hold_if_idle(self):
        """True, with the pool held (no request can start meanwhile), where no request is running;
        False at once otherwise. For callers that must never queue behind a whole sampling run, such
        as the status page."""
        if not self._lock.acquire(blocking=False):
            yield False
            return
        try:
            yield True
        finally:
            self._lock.release()

    def _command(self) -> list[str]:
        o = self.options
        cmd = [o.python, "-m", "torch.distributed.run", "--nproc-per-node", str(o.nproc), "--max-restarts", "0",
               "--monitor-interval", "0.1"]
        if o.nnodes == 1:
            cmd += ["--standalone"]
        else:  # static rendezvous keeps this machine as node 0, so global rank 0 is ours
            cmd += ["--nnodes", str(o.nnodes), "--node-rank", "0", "--master-addr", o.master_addr,
                    "--master-port", str(o.master_port or _free_port())]
        return cmd + ["-m", "worker"]

    def _environment(self) -> dict[str, str]:
        o = self.options
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV and not k.startswith("TORCHELASTIC")}
        if o.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in (o.gpus or range(o.nproc)))
        env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
        env.update(CXD_POOL_DIR=self._dir, CXD_POOL_SECRET=self._secret.hex(), CXD_POOL_ID=self.pool_id,
                   CXD_DEVICE=o.device, CXD_CONTROLLER_PID=str(os.getpid()))
        env.update(o.env)
        return env

    def start(self) -> None:
        with self._lock:
            if self.alive:
                return
            self._stop_processes()
            sweep_stale_dirs()
            self.pool_id, self._secret = new_pool_id(), new_secret()
            self._dir = make_private_dir(POOL_DIR_PREFIX)
            _write_owner(self._dir)
            self._dead.clear()
            self._death_reason = ""
            self._loaded.clear()
            log = open(os.path.join(self._dir, "launcher.log"), "wb")
            try:
                self._proc = subprocess.Popen(self._command(), cwd=REPO_ROOT, env=self._environment(), stdout=log,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True)
            except OSError as e:
                self._stop_processes()  # nothing runs: this removes the directory
                raise PoolStartError(f"cannot start the worker pool with python {self.options.python!r}: "
                                     f"{e.strerror or e}") from e
            finally:
                log.close()
            try:
                self._handshake()
            except BaseException:
                self._stop_processes()
                raise
            self.starts += 1
            threading.Thread(target=self._monitor, args=(self._proc,), daemon=True, name="pool-monitor").start()

    def _handshake(self) -> None:
        sock = os.path.join(self._dir, "rank0.sock")
        listening = os.path.join(self._dir, "rank0.listening")
        deadline = time.monotonic() + self.options.start_timeout
        while not os.path.exists(listening):
            if self._proc.poll() is not None:
                raise PoolStartError("the worker pool failed to start: " + self._root_cause())
            if time.monotonic() > deadline:
                raise PoolStartError(f"the worker pool did not come up within {self.options.start_timeout:.0f} s; "
                                     + self._root_cause())
            time.sleep(0.05)
        conn = connect(sock, self._secret, timeout=max(1.0, deadline - time.monotonic()))
        self._channel = Channel(conn, self.pool_id, REPLY_TYPES)
        msg, _ = self._channel.recv(timeout=max(1.0, deadline - time.monotonic()))
        if msg["type"] != "ready":
            raise PoolStartError(f"unexpected first message from the pool: {msg['type']}")
        self.info = msg["args"]

    def _root_cause(self, first_rank: int | None = None) -> str:
        """Tracebacks the ranks left behind, root cause first, else the end of the launcher's log."""
        paths = [os.path.join(self._dir, n) for n in os.listdir(self._dir) if n.endswith(".error")]
        # The rank that died first, then by time: peers' errors are usually echoes ("connection reset").
        paths.sort(key=lambda p: (os.path.basename(p) != f"rank{first_rank}.error", os.path.getmtime(p)))
        errors = []
        for path in paths:
            with open(path) as f:
                errors.append(f"{os.path.basename(path).split('.')[0].replace('rank', 'rank ')}: {f.read().strip()}")
        if errors:
            return "\n".join(errors)
        try:
            with open(os.path.join(self._dir, "launcher.log"), errors="replace") as f:
                return "launcher output:\n" + "".join(f.readlines()[-30:]).strip()
        except OSError:
            return "no output"

    def _monitor(self, proc: subprocess.Popen) -> None:
        """Notice the first rank (or the launcher) to die, record why, and take the rest down."""
        local = socket.gethostname()
        fds = {}
        for r in self.info.get("ranks", []):
            if r["host"] == local:
                try:
                    fds[os.pidfd_open(r["pid"])] = r
                except (AttributeError, OSError):
                    pass
        try:
            while proc is self._proc and not self._dead.is_set():
                ready = select.select(list(fds), [], [], 0.2)[0] if fds else (time.sleep(0.2) or [])
                if ready or proc.poll() is not None:
                    first = fds[ready[0]] if ready else None
                    if first is not None:
                        what = f"rank {first['rank']} (pid {first['pid']}) died"
                    else:
                        what = f"the worker launcher exited with code {proc.returncode}"
                    time.sleep(0.2)  # let a failing rank finish writing its traceback
                    cause = self._root_cause(first["rank"] if first else None)
                    self._death_reason = f"{what}; last error: {cause}"
                    self._dead.set()
                    self._kill_group(proc)
                    return
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _kill_group(proc: subprocess.Popen, term_wait: float = 5.0) -> None:
        """SIGTERM the launcher's whole process group, then SIGKILL what is left."""
        for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=wait)
                # the launcher is gone; its ranks may linger a moment: sweep the group once more
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue
            return

    def _stop_processes(self) -> None:
        proc, self._proc = self._proc, None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if proc is not None:
            self._kill_group(proc)
        if getattr(self, "pool_id", None):
            sweep_segments(self.pool_id)
        if getattr(self, "_dir", None):
            shutil.rmtree(self._dir, ignore_errors=True)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the ranks to exit, then SIGTERM and SIGKILL whatever did not."""
        with self._lock:
            if self.alive and self._channel is not None:
                try:
                    self._channel.send({"type": "shutdown", "id": next(self._ids), "args": {}})
                    self._channel.recv(timeout=timeout / 2)
                    self._proc.wait(timeout=timeout / 2)
                except Exception:
                    pass  # escalate below
            self._dead.set()
            self._stop_processes()

    # --- requests ------------------------------------------------------------------------
    def request(self, kind: str, args: dict | None = None, tensors: dict | None = None,
                on_progress: ProgressFn | None = None, deadline_s: float | None = None,
                cancel: threading.Event | None = None) -> tuple[dict, dict]:
        """Send one request and wait for its reply; restarts a dead pool first (and reloads its models)."""
        with self._lock:
            if not self.alive:
                self.start()
            args = dict(args or {})
            key = args.get("model_key")
            if key is not None and key not in self._loaded and key in self._loads:
                self._call("load_model", self._loads[key], {}, None, None, None)
            result = self._call(kind, args, tensors or {}, on_progress, deadline_s, cancel)
            if kind == "load_model":
                self._loads[result[0]["model_key"]] = args
                self._loaded.add(result[0]["model_key"])
            elif kind == "unload_model":
                self._loaded.difference_update(result[0].get("unloaded", []))
            return result

    def _call(self, kind, args, tensors, on_progress, deadline_s, cancel) -> tuple[dict, dict]:
        request_id = next(self._ids)
        deadline = None if deadline_s is None else time.time() + deadline_s
        if deadline is not None:
            args = dict(args, deadline=deadline)
        self._send({"type": kind, "id": request_id, "args": args}, tensors)
        cancel_sent, interrupt = False, None
        while True:
            if (cancel is not None and cancel.is_set() or interrupt is not None) and not cancel_sent:
                self._send({"type": "cancel", "id": request_id, "args": {}})
                cancel_sent = True
            if deadline is not None and time.time() > deadline + self.options.deadline_grace:
                self._fail(f"request {kind} passed its deadline of {deadline_s:.1f} s and the ranks did not stop "
                           f"within {self.options.deadline_grace:.0f} s; the pool was restarted")
                raise DeadlineExceeded(self._death_reason)
            msg, out = self._receive()
            if msg is None or msg["id"] != request_id:
                continue  # nothing yet, or a late message of an earlier request
            if msg["type"] == "progress":
                if on_progress is not None and interrupt is None:
                    try:
                        on_progress(msg["args"], out.get("preview"))
                    except BaseException as e:  # e.g. ComfyUI's interrupt: stop the ranks, then re-raise
                        interrupt = e
                continue
            if interrupt is not None:
                raise interrupt
            if msg["type"] == "ok":
                return msg["args"], out
            message, error_kind = msg["args"].get("message", "unknown error"), msg["args"].get("kind", "error")
            if error_kind == "cancelled":
                raise RequestCancelled(message, error_kind)
            if error_kind == "deadline":
                raise DeadlineExceeded(f"request {kind} passed its deadline of {deadline_s:.1f} s")
            raise RequestFailed(message, error_kind)

    def _send(self, msg: dict, tensors: dict | None = None) -> None:
        try:
            self._channel.send(msg, tensors)
        except (OSError, EOFError):
            self._wait_for_death()

    def _receive(self):
        if self._dead.is_set():
            raise PoolDied(self._death_reason)
        try:
            return self._channel.recv(timeout=0.05)
        except TimeoutError:
            return None, {}
        except (OSError, EOFError):
            self._wait_for_death()

    def _wait_for_death(self):
        """The socket broke: give the monitor a moment to name the rank, then fail the request."""
        self._dead.wait(timeout=5.0)
        if not self._dead.is_set():
            self._fail("the connection to rank 0 was lost")
        raise PoolDied(self._death_reason)

    def _fail(self, reason: str) -> None:
        self._death_reason = reason
        self._dead.set()
        if self._proc is not None:
            self._kill_group(self._proc, term_wait=2.0)


# --- pool directories left behind -------------------------------------------------------------
def sweep_stale_dirs(tmp_dir: str | None = None, stale_after: float = STALE_AFTER_S) -> list[str]:
    """Remove this user's pool directories in `tmp_dir` (the temp dir) that no live pool uses, and
    return them. A controller killed together with its ranks (a service manager SIGKILLing the whole
    cgroup, the OOM killer taking the ranks first) leaves its directory behind, and nothing else would
    ever remove it. Never one of a live controller: a pool lives only as long as its controller."""
    tmp_dir = tmp_dir or tempfile.gettempdir()
    try:
        names = os.listdir(tmp_dir)
    except OSError:
        return []
    stale = [os.path.join(tmp_dir, n) for n in names
             if n.startswith(POOL_DIR_PREFIX) and _is_stale(os.path.join(tmp_dir, n), stale_after)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)  # its dying rank 0 may be removing it too
    return stale


def _is_stale(path: str, stale_after: float) -> bool:
    """A directory of ours whose controller is dead; one that names no controller: where it is
    older than `stale_after` and none of its ranks lives. Symlinks and other users' entries never."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return False
    owner = read_owner(path)
    if owner is not None:
        pid, start = owner
        return _process_start(pid) != start
    return time.time() - st.st_mtime > stale_after and not any(_process_start(p) for p in _rank_pids(path))


def _write_owner(pool_dir: str) -> None:
    """Name this process as the directory's owner; written whole or not at all, so that a sweeping
    controller never reads half a start time and takes a live pool for a dead one."""
    path, pid = os.path.join(pool_dir, OWNER_FILE), os.getpid()
    with open(path + ".tmp", "w") as f:
        f.write(f"{pid} {_process_start(pid)}\n")
    os.replace(path + ".tmp", path)


def read_owner(pool_dir: str) -> tuple[int, str] | None:
    """(pid, start time) of the controller that made the directory; None where it names none."""
    try:
        with open(os.path.join(pool_dir, OWNER_FILE)) as f:
            pid, start = f.read().split()
        return int(pid), start
    except (OSError, ValueError):
        return None


def _rank_pids(pool_dir: str) -> list[int]:
    """The pids the ranks wrote to the directory (worker/main.py, once their process group is up)."""
    try:
        names = os.listdir(pool_dir)
    except OSError:
        return []
    pids = []
    for name in names:
        if name.startswith("rank") and name.endswith(".pid"):
            with contextlib.suppress(OSError, ValueError), open(os.path.join(pool_dir, name)) as f:
                pids.append(int(f.read()))
    return pids


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat), which tells it from a
    later process given the same pid; None where it is gone or a zombie; "?" for a live process on a
    system without /proc."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, *fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if state == "Z" else fields[18]  # field 22 of stat(5); the state is field 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
