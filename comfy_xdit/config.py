"""ParallelConfig: the one object that says how work is split over ranks.

Validated once, before any process group exists, so a bad layout fails with a message
that lists what would work instead of a hang or a shape error deep in a collective.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Mesh axes, outermost first. Ulysses is innermost so its all-to-all stays between
# neighbouring ranks (same node, fastest link); ring and pipeline tolerate slower links.
AXES = ("dp", "cfg", "pp", "ring", "ulysses")


class ParallelConfigError(ValueError):
    pass


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelConfig:
    dp_degree: int = 1
    cfg_degree: int = 1
    pipefusion_degree: int = 1
    ring_degree: int = 1
    ulysses_degree: int = 1

    @property
    def sp_degree(self) -> int:
        return self.ring_degree * self.ulysses_degree

    @property
    def world_size(self) -> int:
        return self.dp_degree * self.cfg_degree * self.pipefusion_degree * self.sp_degree

    def degrees(self) -> dict[str, int]:
        """Degrees keyed by mesh axis name, in AXES order."""
        return dict(zip(AXES, (self.dp_degree, self.cfg_degree, self.pipefusion_degree,
                               self.ring_degree, self.ulysses_degree)))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def validate(self, world_size: int | None = None, num_heads: int | None = None) -> "ParallelConfig":
        for name, value in self.as_dict().items():
            if not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"{name} must be a positive integer, got {value!r}")
        if world_size is not None and self.world_size != world_size:
            raise ParallelConfigError(
                f"degrees multiply to {self.world_size} "
                f"(dp {self.dp_degree} x cfg {self.cfg_degree} x pipefusion {self.pipefusion_degree} "
                f"x ring {self.ring_degree} x ulysses {self.ulysses_degree}) but there are {world_size} ranks; "
                f"the product must equal the number of GPUs. Each degree must divide {world_size}: "
                f"choose from {_divisors(world_size)}")
        if num_heads is not None and num_heads % self.ulysses_degree:
            valid = [d for d in _divisors(num_heads) if world_size is None or world_size % d == 0]
            raise ParallelConfigError(
                f"ulysses_degree {self.ulysses_degree} does not divide the model's {num_heads} attention heads; "
                f"use one of {valid} (or move the rest of the degree to ring_degree)")
        if self.cfg_degree > 2:
            raise ParallelConfigError(
                f"cfg_degree {self.cfg_degree}: classifier-free guidance has two branches, use 1 or 2")
        return self

    @classmethod
    def for_sequence_parallel(cls, world_size: int, num_heads: int) -> "ParallelConfig":
        """All ranks on sequence parallelism: as much Ulysses as the heads allow, the rest Ring."""
        ulysses = max(d for d in _divisors(world_size) if num_heads % d == 0)
        return cls(ring_degree=world_size // ulysses, ulysses_degree=ulysses).validate(world_size, num_heads)
