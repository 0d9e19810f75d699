"""Run one function on N local processes joined in a gloo (CPU) or NCCL process group.

Used by the demo and the multi-process tests; the long-lived worker pool has its own entry.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, out_dir: str):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N ranks on few cores: oversubscription costs minutes
    torch.set_num_threads(1)
    device_id = None
    if backend == "nccl":  # bind the GPU before NCCL starts, so no rank guesses its device
        device_id = torch.device("cuda", rank)
        torch.cuda.set_device(device_id)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            device_id=device_id)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_spmd(world_size: int, fn: Callable[..., Any], *args, backend: str = "gloo") -> list[Any]:
    """Call fn(rank, world_size, *args) on every rank; returns each rank's result, by rank.

    fn must be importable (a module-level function): ranks start with the spawn method.
    """
    with tempfile.TemporaryDirectory(prefix="spmd-") as out_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), backend, fn, args, out_dir),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
