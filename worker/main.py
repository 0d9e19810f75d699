"""torchrun entry of a pool worker: every rank runs this program (SPMD).

Rank 0 serves the controller on a private Unix socket and relays each request to all
ranks over a CPU (gloo) control group; every rank then runs the request in lockstep.
An exception inside a request is fatal for the rank that raised it (peers could be stuck
in a collective with it): it writes its traceback to the pool directory and exits, the
controller's monitor sees the death and reports that traceback. Only RequestError, raised
in lockstep on every rank (bad input, cancel, deadline), is answered and survived.

The pool directory (CXD_POOL_DIR) is the controller's to remove. Where the controller dies
without doing so, rank 0 removes it on its way out; on a joining machine (worker/join.py),
whose directory no controller sees, the last rank to exit cleanly removes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import shutil
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from comfy_xdit.pool.controller import read_owner
from comfy_xdit.pool.protocol import MEMORY_CAP_ENV, REQUEST_TYPES, Channel, ProtocolError, accept, listen

from .handlers import RequestError, WorkerState

ENV_DIR, ENV_SECRET, ENV_POOL_ID = "CXD_POOL_DIR", "CXD_POOL_SECRET", "CXD_POOL_ID"
ENV_DEVICE, ENV_CONTROLLER_PID = "CXD_DEVICE", "CXD_CONTROLLER_PID"
IDLE_TIMEOUT = timedelta(days=30)  # followers wait in a broadcast between requests, for hours
ALIGN = 64  # bytes: where each tensor starts in a relayed request's buffer


def _watch_controller(pid: int, pool_dir: str | None) -> None:
    """Exit as soon as the controller dies, whatever this rank is doing (even inside a collective);
    with `pool_dir` (rank 0 only, so one remover), remove the pool directory first, which the dead
    controller cannot."""
    _wait_for_exit(pid)
    if pool_dir is not None:
        _remove_pool_dir(pool_dir, pid)
    os._exit(3)


def _wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    while True:
        if fd is not None:
            if select.select([fd], [], [], None)[0]:
                return
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def _remove_pool_dir(pool_dir: str, controller_pid: int) -> None:
    """Remove the directory where it names `controller_pid` as its owner: never one this rank was
    pointed at by hand, nor one a later controller made. A controller starting meanwhile may be
    sweeping it too, and a peer still writing its error file may keep it: the next start sweeps it."""
    owner = read_owner(pool_dir)
    if owner is not None and owner[0] == controller_pid:
        shutil.rmtree(pool_dir, ignore_errors=True)


def _leave_join_dir(pool_dir: str, rank: int) -> None:
    """A clean exit on a joining machine: remove this rank's pid file, and the directory where no
    peer's file is left (the last rank out; os.rmdir fails on a directory that is not empty, which
    also keeps the error file of a rank that failed). Every peer wrote its pid file before the first
    request reached this rank, so none is still to come."""
    with contextlib.suppress(OSError):
        os.remove(os.path.join(pool_dir, f"rank{rank}.pid"))
        os.rmdir(pool_dir)


def _write_status(pool_dir: str, rank: int, name: str, text: str) -> None:
    path = os.path.join(pool_dir, f"rank{rank}.{name}")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class _Relay:
    """Moves one request (JSON header + tensors) from rank 0 to every rank over the control group: two
    broadcasts, the lengths and then one buffer with the header and every tensor's bytes (a stepwise model
    call is one request per step, so each broadcast counts). With one rank, nothing moves."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.world_size = dist.get_world_size(group)

    def broadcast(self, msg: dict | None, tensors: dict[str, torch.Tensor] | None) -> tuple[dict, dict]:
        if self.world_size == 1:
            return msg, tensors
        if dist.get_rank() == 0:
            specs = {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()}
            header = json.dumps({"msg": msg, "specs": specs}).encode()
            parts = [torch.frombuffer(bytearray(header), dtype=torch.uint8)]
            for v in tensors.values():  # each tensor starts on an ALIGN boundary, so it can be viewed in place
                parts.append(torch.zeros(-sum(p.numel() for p in parts) % ALIGN, dtype=torch.uint8))
                parts.append(v.contiguous().reshape(-1).view(torch.uint8))
            buffer = torch.cat(parts)
            sizes = torch.tensor([len(header), buffer.numel()], dtype=torch.int64)
        else:
            sizes = torch.zeros(2, dtype=torch.int64)
        dist.broadcast(sizes, 0, group=self.group)
        if dist.get_rank() != 0:
            buffer = torch.empty(int(sizes[1]), dtype=torch.uint8)
        dist.broadcast(buffer, 0, group=self.group)
        if dist.get_rank() == 0:
            return msg, tensors
        decoded = json.loads(bytes(buffer[:int(sizes[0])].numpy()).decode())
        out, offset = {}, int(sizes[0])
        for name, (dtype, shape) in decoded["specs"].items():
            dtype = getattr(torch, dtype)
            n = math.prod(shape) * dtype.itemsize
            offset += -offset % ALIGN
            out[name] = buffer[offset:offset + n].view(dtype).reshape(shape)
            offset += n
        return decoded["msg"], out


def _serve_controller(state: WorkerState, relay: _Relay, pool_dir: str, secret: bytes, pool_id: str) -> None:
    listener = listen(os.path.join(pool_dir, "rank0.sock"), secret)
    _write_status(pool_dir, 0, "listening", "1")
    while True:
        channel = Channel(accept(listener), pool_id, REQUEST_TYPES)  # accept() skips unauthenticated clients
        try:
            channel.send({"type": "ready", "id": 0, "args": state.describe()})
        except OSError:
            continue
        if _serve_connection(state, relay, channel):
            return


def _serve_connection(state: WorkerState, relay: _Relay, channel: Channel) -> bool:
    """Serve one controller connection; True when the pool should shut down."""
    inbox: list = []
    arrived = threading.Condition()
    send_lock = threading.Lock()  # the reader answers malformed messages while the main thread runs a request

    def send(msg: dict, tensors: dict | None = None) -> None:
        with send_lock:
            try:
                channel.send(msg, tensors)
            except OSError:  # the controller went away; the reader notices and ends the connection
                pass

    def read():
        while True:
            try:
                item = channel.recv(timeout=None)
            except ProtocolError as e:  # answered; an oversized message also closes the channel
                send({"type": "error", "id": 0, "args": {"message": f"malformed request: {e}", "kind": "protocol"}})
                continue
            except (EOFError, OSError) as e:
                item = ("closed", e)
            with arrived:
                if item[0] != "closed" and item[0].get("type") == "cancel":
                    if item[0]["id"] == state.current_request:  # a late cancel must not stop the next request
                        state.cancel_requested.set()
                else:
                    inbox.append(item)
                arrived.notify()
            if item[0] == "closed":
                return

    threading.Thread(target=read, daemon=True, name="controller-reader").start()
    while True:
        with arrived:
            arrived.wait_for(lambda: inbox)
            item = inbox.pop(0)
        if item[0] == "closed":
            return False
        msg, tensors = item
        with arrived:
            state.current_request = msg["id"]
            state.cancel_requested.clear()
        try:
            state.validate(msg, tensors)
        except RequestError as e:
            send({"type": "error", "id": msg["id"], "args": {"message": str(e), "kind": e.kind}})
            continue
        msg, tensors = relay.broadcast(msg, tensors)
        if msg["type"] == "shutdown":
            send({"type": "ok", "id": msg["id"], "args": {}})
            return True
        _run(state, msg, tensors, send)


def _run(state: WorkerState, msg: dict, tensors: dict, send=None) -> None:
    """Run one request on this rank; `send` (rank 0 only) answers the controller."""
    reply = send or (lambda *_: None)
    try:
        args, out = state.handle(msg, tensors, lambda a, preview=None: reply(
            {"type": "progress", "id": msg["id"], "args": a}, preview))
    except RequestError as e:  # raised on every rank at the same point: the pool stays in step
        reply({"type": "error", "id": msg["id"], "args": {"message": str(e), "kind": e.kind}})
        return
    reply({"type": "ok", "id": msg["id"], "args": args}, out)


def _follow(state: WorkerState, relay: _Relay) -> None:
    while True:
        msg, tensors = relay.broadcast(None, None)
        if msg["type"] == "shutdown":
            return
        _run(state, msg, tensors)


def _cap_memory(device: torch.device, rank: int) -> None:
    caps = [float(x) for x in os.environ.get(MEMORY_CAP_ENV, "").split(",") if x.strip()]
    if caps:
        cap = (caps[rank] if len(caps) > 1 else caps[0]) * 1e9
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)


def main() -> int:
    pool_dir = os.environ[ENV_DIR]
    rank = int(os.environ["RANK"])
    controller_pid = os.environ.get(ENV_CONTROLLER_PID)
    joining = os.environ.get("GROUP_RANK", "0") != "0"
    if controller_pid and not joining:
        threading.Thread(target=_watch_controller, args=(int(controller_pid), pool_dir if rank == 0 else None),
                         daemon=True).start()
    try:
        device_kind = os.environ.get(ENV_DEVICE, "cpu")
        if device_kind == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
            _cap_memory(device, rank)
            dist.init_process_group("nccl", device_id=device)
            control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
            dist.init_process_group("gloo", timeout=IDLE_TIMEOUT)
            control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        state = WorkerState(device, control, pool_dir)
        relay = _Relay(control)
        dist.barrier(group=control)
        _write_status(pool_dir, rank, "pid", str(os.getpid()))
        if rank == 0:
            _serve_controller(state, relay, pool_dir, bytes.fromhex(os.environ[ENV_SECRET]), os.environ[ENV_POOL_ID])
        else:
            _follow(state, relay)
    except BaseException:
        with contextlib.suppress(OSError):  # the directory is gone where the controller died
            _write_status(pool_dir, rank, "error", traceback.format_exc())
        os._exit(1)  # peers may be blocked in a collective with us: do not run teardown
    if joining:
        _leave_join_dir(pool_dir, rank)
    dist.destroy_process_group()
    return 0
