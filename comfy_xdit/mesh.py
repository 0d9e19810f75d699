"""Named device mesh over the parallel axes, built once per process and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import AXES, ParallelConfig


@dataclass
class ParallelMesh:
    config: ParallelConfig
    mesh: DeviceMesh
    device: torch.device

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.mesh.get_group(axis)

    def rank(self, axis: str) -> int:
        return self.mesh.get_local_rank(axis)

    def size(self, axis: str) -> int:
        return self.mesh.size(AXES.index(axis))

    @property
    def sp_rank(self) -> int:
        """Index of this rank's sequence shard: ring-major, ulysses-minor (the gather order)."""
        return self.rank("ring") * self.size("ulysses") + self.rank("ulysses")

    @property
    def sp_degree(self) -> int:
        return self.config.sp_degree


def build_mesh(config: ParallelConfig, device: torch.device | str) -> ParallelMesh:
    """Requires an initialised default process group whose size is config.world_size."""
    device = torch.device(device)
    config.validate(world_size=dist.get_world_size())
    shape = tuple(config.degrees().values())
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=AXES)
    return ParallelMesh(config=config, mesh=mesh, device=device)
