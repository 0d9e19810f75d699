"""Which pool directories a starting controller sweeps (comfy_xdit.pool.controller.sweep_stale_dirs):
those of dead controllers, and old ones that name none and whose ranks are gone; never one of a live
process, a symlink, or anything not named cxd-pool-*. tests/pool/test_pool.py runs the real case."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from comfy_xdit.pool.controller import OWNER_FILE, STALE_AFTER_S, sweep_stale_dirs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def _pool_dir(tmp, name: str, owner: str | None = None, ranks: tuple = (), age: float = 0.0) -> str:
    path = tmp / name
    path.mkdir()
    (path / "launcher.log").write_text("...")
    if owner is not None:
        (path / OWNER_FILE).write_text(owner + "\n")
    for rank, pid in enumerate(ranks):
        (path / f"rank{rank}.pid").write_text(str(pid))
    then = time.time() - age
    os.utime(path, (then, then))
    return str(path)


def test_sweeps_the_dirs_of_dead_controllers_and_keeps_those_of_live_ones(tmp_path):
    me, dead, old = os.getpid(), _dead_pid(), STALE_AFTER_S + 60
    live = _pool_dir(tmp_path, "cxd-pool-live", owner=f"{me} {_start_time(me)}")
    gone = _pool_dir(tmp_path, "cxd-pool-gone", owner=f"{dead} 12345", ranks=(os.getpid(),))
    reused = _pool_dir(tmp_path, "cxd-pool-reused", owner=f"{me} 1")  # our pid, another start: a reused pid
    young = _pool_dir(tmp_path, "cxd-pool-young", ranks=(dead,))
    orphan = _pool_dir(tmp_path, "cxd-pool-orphan", ranks=(dead,), age=old)
    running = _pool_dir(tmp_path, "cxd-pool-running", ranks=(dead, me), age=old)
    other = _pool_dir(tmp_path, "cxd-join-other", owner=f"{dead} 12345", age=old)
    target = _pool_dir(tmp_path, "target", owner=f"{dead} 12345", age=old)
    os.symlink(target, tmp_path / "cxd-pool-link")

    swept = sweep_stale_dirs(str(tmp_path))

    assert sorted(map(os.path.basename, swept)) == ["cxd-pool-gone", "cxd-pool-orphan", "cxd-pool-reused"]
    assert not any(os.path.exists(p) for p in (gone, reused, orphan))
    assert all(os.path.isdir(p) for p in (live, young, running, other, target))
    assert os.path.islink(tmp_path / "cxd-pool-link")


def test_an_owner_file_that_does_not_parse_counts_as_none(tmp_path):
    """Kept while young, swept once old: as a directory whose controller died before naming itself."""
    path = _pool_dir(tmp_path, "cxd-pool-odd", owner=str(os.getpid()))
    assert sweep_stale_dirs(str(tmp_path)) == [] and os.path.isdir(path)
    assert sweep_stale_dirs(str(tmp_path), stale_after=-1) == [path]
