"""How much GPU memory each rank's process holds, as the driver counts it (with its CUDA context,
which the ranks' own allocator numbers leave out): through NVML where nvidia-ml-py is installed,
else nvidia-smi, which comes with the driver. A source that fails once is not asked again."""

from __future__ import annotations

import socket
import subprocess

_nvml_state: dict = {}


def _memory_by_pid_nvml() -> dict[int, int] | None:
    """{pid: bytes} of every compute process on this machine's GPUs through NVML (nvidia-ml-py);
    None where NVML cannot be used."""
    if _nvml_state.get("broken"):
        return None
    try:
        import pynvml
        if not _nvml_state.get("init"):
            pynvml.nvmlInit()
            _nvml_state["init"] = True
        by_pid: dict[int, int] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
                by_pid[proc.pid] = by_pid.get(proc.pid, 0) + (proc.usedGpuMemory or 0)
        return by_pid
    except Exception:  # not installed, no driver, no permission
        _nvml_state["broken"] = True
        return None


def _memory_by_pid_smi() -> dict[int, int] | None:
    """The same through nvidia-smi; None where it is missing or fails."""
    if _nvml_state.get("smi_broken"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        _nvml_state["smi_broken"] = True
        return None
    if out.returncode != 0:
        return None
    by_pid: dict[int, int] = {}
    for line in out.stdout.splitlines():
        try:
            pid, mib = (int(x) for x in line.split(","))
        except ValueError:
            continue
        by_pid[pid] = by_pid.get(pid, 0) + mib * 2 ** 20
    return by_pid


def nvml_memory_used(ranks: list[dict]) -> dict[int, int]:
    """{rank: bytes of GPU memory its process holds}, for the CUDA ranks on this machine (the ranks of
    a pool description); {} where neither NVML nor nvidia-smi answers (memory unknown)."""
    local = [r for r in ranks if r.get("host") in (None, socket.gethostname()) and r.get("pid")
             and str(r.get("device", "cuda")).startswith("cuda")]
    if not local:
        return {}
    by_pid = _memory_by_pid_nvml()
    if by_pid is None:
        by_pid = _memory_by_pid_smi() or {}
    return {r["rank"]: by_pid[r["pid"]] for r in local if r["pid"] in by_pid}
