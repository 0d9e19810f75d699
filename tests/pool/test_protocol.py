import json
import multiprocessing.connection as mpc
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from multiprocessing import AuthenticationError, Pipe

import pytest
import torch

from comfy_xdit.pool.protocol import (MAX_MESSAGE_BYTES, REPLY_TYPES, REQUEST_TYPES, Channel, ProtocolError, accept,
                                      connect, decode_message, encode_message, list_segments, listen,
                                      make_private_dir, new_pool_id, new_secret, open_segment, sweep_segments)


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    # Any unpickling on the receive path would be a remote-code-execution hole.
    def boom(*a, **k):
        raise AssertionError("unpickling must never happen")
    monkeypatch.setattr(mpc.Connection, "recv", boom)
    monkeypatch.setattr(mpc._ForkingPickler, "loads", boom)


@pytest.fixture
def pool_id():
    pid = new_pool_id()
    yield pid
    assert list_segments(pid) == [], "a shared-memory segment leaked"
    sweep_segments(pid)


@pytest.fixture
def pipe(pool_id):
    a, b = Pipe()
    yield Channel(a, pool_id, REPLY_TYPES), Channel(b, pool_id, REQUEST_TYPES), a, b
    a.close(), b.close()


@pytest.fixture
def sockdir():
    d = make_private_dir("cxd-test-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "i64": torch.tensor([-(2**40), 0, 7]),
        "i32": torch.arange(-6, 6, dtype=torch.int32).reshape(3, 4),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar_bf16": torch.tensor(1.5, dtype=torch.bfloat16),
        "scalar_i64": torch.tensor(42),
        "empty": torch.empty(0, 4),
        "empty_bool": torch.empty(2, 0, dtype=torch.bool),
        "noncontig": torch.randn(4, 6, generator=g).t(),
        "grad": torch.randn(2, requires_grad=True),
    }


def assert_same(got, sent):
    assert got.keys() == sent.keys()
    for k, t in sent.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k], t.detach()), k
        assert got[k].is_contiguous()


def raw_ref(shm, dtype="float32", shape=(2,)):
    return {"shm": shm, "dtype": dtype, "shape": list(shape)}


def raw(mtype="sample", mid=1, **extra):
    return encode_message({"type": mtype, "id": mid, **extra})


def test_round_trip_over_pipe(pipe, pool_id):
    ctl, worker, _, _ = pipe
    sent = sample_tensors()
    ctl.send({"type": "sample", "id": 3, "args": {"steps": 4, "seed": 1}}, sent)
    assert len(list_segments(pool_id)) == len(sent)  # in flight until the receiver takes them
    msg, got = worker.recv(timeout=5)
    assert msg == {"type": "sample", "id": 3, "args": {"steps": 4, "seed": 1}, "tensors": msg["tensors"]}
    assert msg["tensors"]["bf16"] == {"shm": msg["tensors"]["bf16"]["shm"], "dtype": "bfloat16", "shape": [2, 3, 4]}
    assert_same(got, sent)
    assert list_segments(pool_id) == []
    worker.send({"type": "ok", "id": 3})
    assert ctl.recv(timeout=5) == ({"type": "ok", "id": 3, "args": {}, "tensors": {}}, {})


def test_round_trip_over_unix_socket(pool_id, sockdir):
    secret, path = new_secret(), os.path.join(sockdir, "pool.sock")
    listener = listen(path, secret)

    def serve():  # echo the tensors back, as rank 0 would answer a request
        ch = Channel(accept(listener), pool_id, REQUEST_TYPES)
        msg, ts = ch.recv(timeout=5)
        ch.send({"type": "ok", "id": msg["id"], "args": {"echo": msg["args"]}}, ts)
        ch.recv(timeout=5)  # wait for shutdown so the reply is read before we close
        ch.close()

    server = threading.Thread(target=serve)
    server.start()
    try:
        assert stat.S_IMODE(os.stat(sockdir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        ctl = Channel(connect(path, secret, timeout=5), pool_id, REPLY_TYPES)
        sent = sample_tensors()
        ctl.send({"type": "decode", "id": 9, "args": {"tile": True}}, sent)
        msg, got = ctl.recv(timeout=5)
        assert (msg["type"], msg["id"], msg["args"]) == ("ok", 9, {"echo": {"tile": True}})
        assert_same(got, sent)
        ctl.send({"type": "shutdown", "id": 10})
    finally:
        server.join(10)
        listener.close()
    assert not server.is_alive()
    assert not os.path.exists(path)


def test_wrong_secret_rejected_and_listener_keeps_serving(sockdir, pool_id):
    secret, path = new_secret(), os.path.join(sockdir, "pool.sock")
    listener = listen(path, secret)
    seen = []

    def serve():
        try:
            listener.accept()
        except AuthenticationError as e:
            seen.append(e)
        ch = Channel(accept(listener), pool_id, REQUEST_TYPES)
        seen.append(ch.recv(timeout=5)[0]["type"])
        ch.close()

    server = threading.Thread(target=serve)
    server.start()
    try:
        with pytest.raises(AuthenticationError):
            connect(path, b"x" * 32, timeout=5)
        Channel(connect(path, secret, timeout=5), pool_id, REPLY_TYPES).send({"type": "status", "id": 0})
    finally:
        server.join(10)
        listener.close()
    assert isinstance(seen[0], AuthenticationError) and seen[1] == "status"


def test_accept_skips_bad_clients(sockdir, pool_id):
    secret, path = new_secret(), os.path.join(sockdir, "pool.sock")
    listener = listen(path, secret)
    got = []
    server = threading.Thread(target=lambda: got.append(accept(listener)))
    server.start()
    try:
        for _ in range(2):
            with pytest.raises(AuthenticationError):
                connect(path, b"wrong", timeout=5)
        connect(path, secret, timeout=5).close()
    finally:
        server.join(10)
        listener.close()
    assert len(got) == 1


def test_connect_times_out(sockdir):
    with pytest.raises(TimeoutError, match="no worker pool accepted a connection"):
        connect(os.path.join(sockdir, "missing.sock"), new_secret(), timeout=0.3)


def test_recv_timeout(pipe):
    with pytest.raises(TimeoutError):
        pipe[1].recv(timeout=0.05)


@pytest.mark.parametrize("data, fragment", [
    (b"\x80not json", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (raw("launch_missiles"), "unknown message type 'launch_missiles'"),
    (raw("ok"), "unknown message type 'ok'"),  # a reply type is not a request
    (json.dumps({"id": 1}).encode(), "unknown message type None"),
    (raw(mid=-1), "non-negative integer, got -1"),
    (raw(mid=True), "non-negative integer, got True"),
    (raw(mid="1"), "non-negative integer, got '1'"),
    (raw(args=[1]), "args must be a JSON object"),
    (raw(extra=1), "unknown keys ['extra']"),
    (raw(tensors=[]), "tensors must be a JSON object"),
    (raw(tensors={"x": raw_ref("../etc")}), "shm name '../etc' is not a cxd_<pool>_<id>"),
    (raw(tensors={"x": raw_ref("psm_123")}), "shm name 'psm_123'"),
    (raw(tensors={"x": raw_ref("cxd_0123abcd_a/b")}), "is not a cxd_"),
    (raw(tensors={"x": raw_ref("cxd_0123ABCD_ab")}), "is not a cxd_"),
    (raw(tensors={"x": raw_ref("cxd_0123abcd_" + "a" * 65)}), "is not a cxd_"),
    (raw(tensors={"x": raw_ref("cxd_0123abcd_ab", dtype="float64")}), "dtype 'float64' is not allowed"),
    (raw(tensors={"x": raw_ref("cxd_0123abcd_ab", shape=[2**20, 2**20])}), "too large"),
    (raw(tensors={"x": raw_ref("cxd_0123abcd_ab", shape=[0, 2**40])}), "too large"),
    (raw(tensors={"x": raw_ref("cxd_0123abcd_ab", shape=[1] * 9)}), "9 dimensions; the limit is 8"),
    (raw(tensors={"x": raw_ref("cxd_0123abcd_ab", shape=[-1])}), "non-negative integers"),
    (raw(tensors={"x": raw_ref("cxd_0123abcd_ab", shape=[1.5])}), "non-negative integers"),
    (raw(tensors={"x": {"shm": "cxd_0123abcd_ab"}}), "exactly the keys"),
    (raw(tensors={f"t{i}": raw_ref(f"cxd_0123abcd_{i}") for i in range(65)}), "65 tensors; the limit is 64"),
    (b" " * (MAX_MESSAGE_BYTES + 1), "the limit is 1048576"),
])
def test_decode_rejects(data, fragment):
    with pytest.raises(ProtocolError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace("*", r"\*")):
        decode_message(data, REQUEST_TYPES)


def test_decode_defaults():
    assert decode_message(b'{"type":"status","id":0}', REQUEST_TYPES) == {"type": "status", "id": 0, "args": {},
                                                                          "tensors": {}}


def test_oversized_message_over_channel(pipe):
    _, worker, a, _ = pipe

    def send_big():
        try:
            a.send_bytes(b" " * (MAX_MESSAGE_BYTES + 1))
        except OSError:
            pass  # receiver hung up mid-message, as it should

    t = threading.Thread(target=send_big)
    t.start()
    with pytest.raises(ProtocolError, match="exceeds 1048576 bytes"):
        worker.recv(timeout=5)
    t.join(10)
    assert not t.is_alive() and worker.conn.closed


def _make_segment(name, data: bytes):
    shm = open_segment(name, create=True, size=len(data))
    shm.buf[:len(data)] = data
    shm.close()


def test_ref_larger_than_segment_is_rejected_and_unlinked(pipe, pool_id):
    _, worker, a, _ = pipe
    name = f"cxd_{pool_id}_small"
    _make_segment(name, b"\0" * 4)
    a.send_bytes(raw(tensors={"x": raw_ref(name, shape=[100])}))
    with pytest.raises(ProtocolError, match="holds 4 bytes but float32\\[100\\] needs 400"):
        worker.recv(timeout=5)
    assert list_segments(pool_id) == []


def test_missing_segment(pipe, pool_id):
    _, worker, a, _ = pipe
    a.send_bytes(raw(tensors={"x": raw_ref(f"cxd_{pool_id}_gone")}))
    with pytest.raises(ProtocolError, match="does not exist"):
        worker.recv(timeout=5)


def test_invalid_message_still_reclaims_its_segments(pipe, pool_id):
    _, worker, a, _ = pipe
    good = f"cxd_{pool_id}_good"
    _make_segment(good, b"\0" * 8)
    a.send_bytes(raw(tensors={"a": raw_ref(good), "b": raw_ref(f"cxd_{pool_id}_x", dtype="complex64")}))
    with pytest.raises(ProtocolError, match="complex64"):
        worker.recv(timeout=5)
    assert list_segments(pool_id) == []


def test_foreign_pool_segment_is_neither_read_nor_unlinked(pipe, pool_id):
    _, worker, a, _ = pipe
    other = new_pool_id()
    name = f"cxd_{other}_theirs"
    _make_segment(name, b"\0" * 8)
    try:
        a.send_bytes(raw(tensors={"x": raw_ref(name)}))
        with pytest.raises(ProtocolError, match=f"does not belong to pool {pool_id}"):
            worker.recv(timeout=5)
        assert list_segments(other) == [name]
    finally:
        assert sweep_segments(other) == 1


def test_send_rejects_bad_input_without_leaking(pipe, pool_id):
    ctl = pipe[0]
    with pytest.raises(ProtocolError, match="cannot be sent"):
        ctl.send({"type": "sample", "id": 1}, {"ok": torch.ones(2), "bad": torch.ones(2, dtype=torch.complex64)})
    with pytest.raises(ProtocolError, match="non-negative integer"):
        ctl.send({"type": "sample", "id": -5}, {"ok": torch.ones(2)})
    assert list_segments(pool_id) == []


def test_sweep_segments(pool_id):
    for i in range(3):
        _make_segment(f"cxd_{pool_id}_leak{i}", b"x")
    other = new_pool_id()
    _make_segment(f"cxd_{other}_keep", b"x")
    assert list_segments(pool_id) == [f"cxd_{pool_id}_leak{i}" for i in range(3)]
    assert sweep_segments(pool_id) == 3
    assert list_segments(pool_id) == [] and sweep_segments(pool_id) == 0
    assert list_segments(other) == [f"cxd_{other}_keep"]
    assert sweep_segments(other) == 1


FLAG = []


def _set_flag():
    FLAG.append("unpickled")


class Evil:
    def __reduce__(self):
        return _set_flag, ()


def test_pickle_payload_is_never_unpickled(pipe):
    _, worker, a, _ = pipe
    a.send(Evil())  # what a hostile peer using pickle would send
    with pytest.raises(ProtocolError, match="not valid JSON"):
        worker.recv(timeout=5)
    assert FLAG == []


def test_ids_and_pool_ids():
    assert len(new_pool_id()) == 8 and int(new_pool_id(), 16) >= 0
    assert len(new_secret()) == 32 and new_secret() != new_secret()
    with pytest.raises(ValueError, match="8 lowercase hex digits"):
        Channel(Pipe()[0], "../x", REQUEST_TYPES)
    with pytest.raises(ValueError):
        list_segments("*")


def test_segments_outlive_the_process_that_created_or_attached_them(pool_id):
    # Without untracking, the exiting process's resource_tracker would unlink the peer's segments.
    code = ("import sys; from comfy_xdit.pool.protocol import open_segment as o; "
            "o(sys.argv[1], create=True, size=8).close(); o(sys.argv[2]).close()")
    _make_segment(f"cxd_{pool_id}_mine", b"x")
    r = subprocess.run([sys.executable, "-c", code, f"cxd_{pool_id}_made", f"cxd_{pool_id}_mine"],
                       capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert list_segments(pool_id) == [f"cxd_{pool_id}_made", f"cxd_{pool_id}_mine"]
    assert sweep_segments(pool_id) == 2
