"""Wire protocol between the ComfyUI controller and rank 0 of the worker pool.

Messages are small JSON objects sent with ``send_bytes``/``recv_bytes`` (never
``send``/``recv``, which pickle: a peer must not be able to run code in us).
Tensors travel through POSIX shared memory: the sender creates one segment per
tensor and closes its handle; the receiver copies the data out and unlinks it.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import secrets
import socket
import sys
import tempfile
import time
import uuid
from multiprocessing import AuthenticationError, shared_memory
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge

import torch

try:
    import _posixshmem
except ImportError:  # non-POSIX: no shared-memory transport
    _posixshmem = None


class ProtocolError(Exception):
    pass


REQUEST_TYPES = {"load_model", "unload_model", "sample", "forward", "decode", "encode", "status", "cancel", "shutdown"}
REPLY_TYPES = {"ready", "ok", "error", "progress"}
# GB each rank may use on its GPU ("16", or one value per rank "10.5,16"), set in the workers'
# environment: emulates smaller cards on a large one (the bench's --memory-cap-gb)
MEMORY_CAP_ENV = "CXD_MEMORY_CAP_GB"
MAX_MESSAGE_BYTES = 1 << 20
MAX_TENSORS = 64
MAX_NDIM = 8
MAX_NUMEL = 2**34
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
          "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SHM_NAME_RE = re.compile(r"^cxd_[0-9a-f]{8}_[0-9a-zA-Z_]{1,64}$")
_POOL_ID_RE = re.compile(r"^[0-9a-f]{8}$")
_SHM_DIR = "/dev/shm"
_MSG_KEYS = {"type", "id", "args", "tensors"}
_REF_KEYS = {"shm", "dtype", "shape"}


def new_pool_id() -> str:
    return secrets.token_hex(4)


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def _check_pool_id(pool_id: str) -> str:
    if not isinstance(pool_id, str) or not _POOL_ID_RE.match(pool_id):
        raise ValueError(f"pool_id must be 8 lowercase hex digits, got {pool_id!r}")
    return pool_id


# ---------------------------------------------------------------- shared memory

def open_segment(name: str, create: bool = False, size: int = 0) -> shared_memory.SharedMemory:
    """Create or attach a segment without resource_tracker ownership.

    Before 3.13 the tracker registers segments on create *and* attach and unlinks them
    when this process exits, which would destroy segments the peer still owns.
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name, create=create, size=size, track=False)
    from multiprocessing import resource_tracker
    shm = shared_memory.SharedMemory(name, create=create, size=size)
    resource_tracker.unregister(shm._name, "shared_memory")
    return shm


def _unlink(name: str) -> bool:
    # Direct shm_unlink: SharedMemory.unlink() would also unregister, which the tracker
    # reports as an error for segments open_segment already unregistered.
    try:
        _posixshmem.shm_unlink("/" + name)
        return True
    except FileNotFoundError:
        return False


def list_segments(pool_id: str) -> list[str]:
    prefix = f"cxd_{_check_pool_id(pool_id)}_"
    try:
        return sorted(n for n in os.listdir(_SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:  # no /dev/shm (not Linux): nothing we can enumerate
        return []


def sweep_segments(pool_id: str) -> int:
    """Unlink every segment of this pool; call at pool shutdown/restart so a crash never leaks memory."""
    return sum(_unlink(n) for n in list_segments(pool_id))


# ---------------------------------------------------------------- messages

def encode_message(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode("utf-8")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_ref(key, ref) -> dict:
    where = f"tensor {key!r}"
    if not isinstance(ref, dict) or set(ref) != _REF_KEYS:
        raise ProtocolError(f"{where}: ref must be an object with exactly the keys 'shm', 'dtype', 'shape'")
    shm, dtype, shape = ref["shm"], ref["dtype"], ref["shape"]
    if not isinstance(shm, str) or not SHM_NAME_RE.match(shm):
        raise ProtocolError(f"{where}: shm name {shm!r} is not a cxd_<pool>_<id> segment name")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(f"{where}: dtype {dtype!r} is not allowed; use one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ProtocolError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if len(shape) > MAX_NDIM:
        raise ProtocolError(f"{where}: shape has {len(shape)} dimensions; the limit is {MAX_NDIM}")
    if math.prod(shape) >= MAX_NUMEL or any(d >= MAX_NUMEL for d in shape):
        raise ProtocolError(f"{where}: shape {shape} is too large (numel must be < 2**34)")
    return {"shm": shm, "dtype": dtype, "shape": shape}


def decode_message(data: bytes, allowed_types) -> dict:
    """Parse and validate one message; returns {"type", "id", "args", "tensors"} with defaults filled in."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message is {len(data)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        msg = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"message is not valid JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(msg).__name__}")
    if extra := set(msg) - _MSG_KEYS:
        raise ProtocolError(f"message has unknown keys {sorted(extra)}; allowed are {sorted(_MSG_KEYS)}")
    mtype = msg.get("type")
    if not isinstance(mtype, str) or mtype not in allowed_types:
        raise ProtocolError(f"unknown message type {mtype!r}; expected one of {sorted(allowed_types)}")
    mid = msg.get("id")
    if not _is_int(mid) or mid < 0:
        raise ProtocolError(f"message id must be a non-negative integer, got {mid!r}")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(f"message args must be a JSON object, got {type(args).__name__}")
    tensors = msg.get("tensors", {})
    if not isinstance(tensors, dict):
        raise ProtocolError(f"message tensors must be a JSON object, got {type(tensors).__name__}")
    if len(tensors) > MAX_TENSORS:
        raise ProtocolError(f"message has {len(tensors)} tensors; the limit is {MAX_TENSORS}")
    return {"type": mtype, "id": mid, "args": args, "tensors": {k: _check_ref(k, r) for k, r in tensors.items()}}


def _referenced_segments(data: bytes, prefix: str) -> set[str]:
    # Lenient re-parse so even a message that failed validation has its valid-looking segments reclaimed.
    try:
        tensors = json.loads(data.decode("utf-8")).get("tensors")
        refs = tensors.values() if isinstance(tensors, dict) else ()
    except Exception:
        return set()
    names = (r.get("shm") for r in refs if isinstance(r, dict))
    return {n for n in names if isinstance(n, str) and SHM_NAME_RE.match(n) and n.startswith(prefix)}


class Channel:
    """One end of a controller <-> pool connection; ``allowed_types`` are the types this end accepts.

    The controller uses ``Channel(conn, pool_id, REPLY_TYPES)``, rank 0 ``Channel(conn, pool_id, REQUEST_TYPES)``.
    Not thread-safe: use one sender and one receiver at a time.
    """

    def __init__(self, conn: Connection, pool_id: str, allowed_types):
        self.conn, self.pool_id, self.allowed_types = conn, _check_pool_id(pool_id), frozenset(allowed_types)
        self._prefix = f"cxd_{pool_id}_"

    def close(self) -> None:
        self.conn.close()

    def _write(self, key: str, t: torch.Tensor) -> dict:
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPE_NAMES:
            raise ProtocolError(f"tensor {key!r}: dtype {getattr(t, 'dtype', type(t))} cannot be sent; "
                                f"use one of {sorted(DTYPES)}")
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        name = f"{self._prefix}{uuid.uuid4().hex[:16]}"
        # A POSIX segment is a /dev/shm file: write() fills tmpfs pages in bulk, far cheaper than
        # faulting in a fresh mapping page by page (201 MB image: ~4x faster).
        fd = os.open(os.path.join(_SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"\0")
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except BaseException:
            _unlink(name)
            raise
        finally:
            os.close(fd)
        return {"shm": name, "dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)}

    def send(self, msg: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        refs: dict[str, dict] = {}
        try:
            for key, t in (tensors or {}).items():
                refs[key] = self._write(key, t)
            data = encode_message({**msg, "tensors": refs} if refs else msg)
            decode_message(data, REQUEST_TYPES | REPLY_TYPES)  # fail here, not in the peer
            self.conn.send_bytes(data)
        except BaseException:
            for ref in refs.values():  # the peer never saw them, so it cannot unlink them
                _unlink(ref["shm"])
            raise

    def _read(self, key: str, ref: dict) -> torch.Tensor:
        name = ref["shm"]
        if not name.startswith(self._prefix):
            raise ProtocolError(f"tensor {key!r}: segment {name} does not belong to pool {self.pool_id}")
        dtype = DTYPES[ref["dtype"]]
        nbytes = math.prod(ref["shape"]) * dtype.itemsize
        try:
            fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDWR)
        except FileNotFoundError:
            raise ProtocolError(f"tensor {key!r}: shared-memory segment {name} does not exist") from None
        try:
            size = os.fstat(fd).st_size
            if size < nbytes:
                raise ProtocolError(f"tensor {key!r}: segment {name} holds {size} bytes but "
                                    f"{ref['dtype']}{ref['shape']} needs {nbytes}")
            if not nbytes:
                return torch.empty(ref["shape"], dtype=dtype)
            # Zero copy: the tensor keeps the mapping alive after the name is unlinked; MAP_POPULATE
            # maps every page at once instead of one fault per page.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapping = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes).view(dtype).reshape(ref["shape"])

    def recv(self, timeout: float | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"no message within {timeout} s")
        try:
            data = self.conn.recv_bytes(MAX_MESSAGE_BYTES)
        except OSError as e:
            if isinstance(e, ConnectionError):
                raise
            # The body was left unread, so the stream can no longer be framed.
            self.conn.close()
            raise ProtocolError(f"message exceeds {MAX_MESSAGE_BYTES} bytes; connection closed") from e
        try:
            msg = decode_message(data, self.allowed_types)
            return msg, {k: self._read(k, r) for k, r in msg["tensors"].items()}
        finally:
            for name in _referenced_segments(data, self._prefix):
                _unlink(name)


# ---------------------------------------------------------------- socket

def make_private_dir(prefix: str) -> str:
    """A fresh 0700 temp dir for the pool socket: only our user can even reach it."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o700)
    return path


def listen(path: str, secret: bytes) -> Listener:
    """Listen on an AF_UNIX socket at ``path`` (mode 0600), authenticating clients with ``secret``.

    ``Listener.accept()`` runs multiprocessing's HMAC challenge (bytes only, no pickle) and
    raises AuthenticationError for a client with the wrong secret; the listener stays usable,
    so serve with ``accept(listener)`` below, or loop on ``listener.accept()`` catching
    ``(AuthenticationError, EOFError, ConnectionError)`` and continue.
    """
    old = os.umask(0o177)
    try:
        listener = Listener(path, family="AF_UNIX", authkey=secret)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return listener


def accept(listener: Listener) -> Connection:
    """Next authenticated connection; clients that fail or abandon the handshake are skipped."""
    while True:
        try:
            return listener.accept()
        except (AuthenticationError, EOFError, ConnectionError):
            continue


def connect(path: str, secret: bytes, timeout: float) -> Connection:
    """Connect to the pool at ``path``, retrying until it listens; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(max(deadline - time.monotonic(), 0.01))
                s.connect(path)
                s.setblocking(True)
                conn = Connection(s.detach())
            break
        except (FileNotFoundError, ConnectionRefusedError, socket.timeout):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no worker pool accepted a connection at {path} within {timeout} s") from None
            time.sleep(0.05)
    try:
        # The server speaks first; poll so a listener that never accepts cannot hang us.
        if not conn.poll(max(deadline - time.monotonic(), 0.01)):
            raise TimeoutError(f"worker pool at {path} did not start the handshake within {timeout} s")
        answer_challenge(conn, secret)
        deliver_challenge(conn, secret)
    except BaseException:
        conn.close()
        raise
    return conn
