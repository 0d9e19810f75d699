"""A DiT as a block list: what each family's spec names (which ModuleLists hold the blocks, in order, which
modules embed and which form the head), and the generic uses of it: a PipeFusion stage's residency, fp8
storage of the blocks, per-block parameter costs, and random weights for tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fp8 import to_fp8


@dataclass(frozen=True)
class BlockLayout:
    containers: tuple[str, ...]   # ModuleList attributes holding the blocks, in the order they run
    embedders: tuple[str, ...]    # needed by the stage holding the first block only
    head: tuple[str, ...]         # needed by the stage holding the last block only

    def blocks(self, transformer) -> list[torch.nn.Module]:
        return [b for name in self.containers for b in getattr(transformer, name)]

    def keep_stage(self, transformer, start: int, stop: int):
        """Keep blocks [start, stop); the others become nn.Identity (indices stay stable for key mapping) and
        the embedders and head go unless this stage runs them. Applied before any weight is read."""
        n = len(self.blocks(transformer))
        if not 0 <= start < stop <= n:
            raise ValueError(f"stage ({start}, {stop}) is not a block range of this {n}-block model")
        i = 0
        for name in self.containers:
            blocks = getattr(transformer, name)
            for j in range(len(blocks)):
                if not start <= i < stop:
                    blocks[j] = torch.nn.Identity()
                i += 1
        for name in (self.embedders if start > 0 else ()) + (self.head if stop < n else ()):
            setattr(transformer, name, None)
        return transformer

    def make_resident(self, transformer, stage: tuple[int, int] | None = None, fp8: bool = False):
        """A loader's residency before any tensor is read: only `stage`'s blocks (keep_stage), fp8 storage."""
        if stage is not None:
            self.keep_stage(transformer, *stage)
        if fp8:
            self.store_fp8(transformer)
        return transformer

    def store_fp8(self, transformer):
        """fp8 storage (models/fp8.py) for the Linear weights inside the blocks (99%+ of a DiT's parameters).
        The rest stays in the compute dtype, so the first parameter still tells the compute dtype."""
        for name in self.containers:
            to_fp8(getattr(transformer, name))
        return transformer

    def costs(self, transformer) -> list[int]:
        """Parameters per block, the embedders counted on the first block and the head on the last (works on a
        meta-device model, so residency is planned before any weight is read): what PipeFusion balances."""
        costs = [_numel(b) for b in self.blocks(transformer)]
        costs[0] += sum(_numel(getattr(transformer, n)) for n in self.embedders)
        costs[-1] += sum(_numel(getattr(transformer, n)) for n in self.head)
        return costs


def _numel(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


@torch.no_grad()
def random_transformer(model_class, config: dict, layout: BlockLayout, seed: int = 0, dtype=torch.float32,
                       device="cpu", std: float | None = None, fp8: bool = False,
                       stage: tuple[int, int] | None = None, width: int | None = None):
    """Eval-mode model with every parameter (and buffer) drawn from N(0, std); norm scales ("norm" in the name,
    1-D) from 1 + N(0, 2 std). std defaults to 0.05 at width 128, shrinking with sqrt(width) so wide models stay
    well conditioned. fp8 and stage as the loaders take them: the same values as the whole model cut and cast
    afterwards, without ever holding the whole model (the other blocks' noise is drawn and dropped)."""
    with torch.device("meta"):  # allocate once, in the target dtype
        model = model_class(**config)
    if std is None:
        std = 0.05 * (128 / (width or 128)) ** 0.5
    shapes = {name: t.shape for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    torch.nn.Module.to(model, dtype)  # ModelMixin.to warns about fp32-kept modules
    layout.keep_stage(model, *stage) if stage is not None else None
    if fp8:
        layout.store_fp8(model)
    model.to_empty(device=device)  # every tensor is overwritten below
    tensors = dict(list(model.named_parameters()) + list(model.named_buffers()))
    gen = torch.Generator(device).manual_seed(seed)
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std
        if name in tensors:  # RMSNorm/LayerNorm scales stay near 1 so attention logits are neither zero nor huge
            module = name.rsplit(".", 2)[-2] if "." in name else ""
            scale = ("norm" in module and len(shape) == 1 and name.endswith("weight"))
            tensors[name].copy_((1 + 2 * noise if scale else noise).to(dtype))  # via dtype: fp8 as a cast model
    return model.eval().requires_grad_(False)
