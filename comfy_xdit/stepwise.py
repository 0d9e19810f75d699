"""The stepwise path in the workers: one model call of ComfyUI's own sampling code, run on the mesh.

ComfyUI's sampler runs in its own process and calls the diffusion model once per step (or per cond / uncond
batch); each call becomes one pool request. Conditioning arrives once per sampling run and is cached here
by a key the caller picks (ComfyUI's cond uuid, shape and a checksum); later calls name the keys only.

The rows of a call (ComfyUI batches cond and uncond chunks, and images, into one batch) are spread over
the mesh's batch-like axes, cfg and dp, as contiguous shares; each share runs the sequence-parallel
forward inside its group, and the shares are gathered in row order on every rank.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist

from .sampling import batch_split

CACHE_ENTRIES = 32  # conditioning chunks kept (cond and uncond of a few runs); the oldest unused go first


class CondCache:
    """Conditioning chunks by key (an LRU): name -> tensor rows, on the model's device. Every rank stores and
    evicts in the same order (the same requests in the same order), so rank 0's view holds for all."""

    def __init__(self, entries: int = CACHE_ENTRIES):
        self.entries = entries
        self._chunks: OrderedDict[str, dict] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._chunks

    def put(self, key: str, tensors: dict) -> None:
        self._chunks[key] = tensors
        self._chunks.move_to_end(key)
        while len(self._chunks) > self.entries:
            self._chunks.popitem(last=False)

    def get(self, key: str) -> dict:
        self._chunks.move_to_end(key)
        return self._chunks[key]

    def clear(self) -> None:
        self._chunks.clear()


def join_chunks(chunks: list[dict]) -> dict:
    """One conditioning dict for the whole batch: each name's chunk rows concatenated in chunk order."""
    names = set(chunks[0])
    for chunk in chunks[1:]:
        if set(chunk) != names:
            raise ValueError(f"the chunks of one model call carry different inputs: {sorted(names)} and "
                             f"{sorted(chunk)}")
    return {name: torch.cat([chunk[name] for chunk in chunks]) for name in sorted(names)}


def comfy_name(names: dict, sent: str) -> str:
    """A ComfyUI model input's name as the family's conditioning names it; a list input's items (name.<i>) keep
    their index."""
    base, dot, index = sent.partition(".")
    return names[base] + dot + index


def indexed_lists(cond: dict) -> dict:
    """name.<i> entries (a ComfyUI list input, e.g. Qwen-Image-Edit's ref_latents) back into a list under name."""
    out, lists = {}, {}
    for k, v in cond.items():
        base, dot, index = k.partition(".")
        if dot and index.isdigit():
            lists.setdefault(base, {})[int(index)] = v
        else:
            out[k] = v
    out.update({base: [items[i] for i in sorted(items)] for base, items in lists.items()})
    return out


def pad_to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """x [N, C, h, w] (or video [N, C, t, h, w]) padded at the bottom and right to whole patches, circularly, as ComfyUI's DiTs pad a latent
    whose size is not a multiple of the patch (comfy.ldm.common_dit.pad_to_patch_size); the caller crops the
    output back to h x w."""
    pad = (0, -x.shape[-1] % patch, 0, -x.shape[-2] % patch) + ((0, 0) if x.dim() == 5 else ())  # video: frames kept
    return torch.nn.functional.pad(x, pad, mode="circular") if any(pad) else x


def share_rows(rows: int, groups: int) -> list[tuple[int, int]]:
    """(start, stop) of each group's contiguous share of `rows` rows (as sampling.batch_split shares a batch).
    With fewer rows than groups, group g repeats the row of group g mod rows (it would idle otherwise), so no
    group holds an empty share."""
    if rows >= groups:
        return batch_split(rows, groups)
    return [(g % rows, g % rows + 1) for g in range(groups)]


def forward_rows(model, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """model.forward for a batch of rows, the rows split over the cfg and dp axes (group index dp-major); the
    full result on every rank. Without a mesh, or with one batch group, it is model.forward itself."""
    mesh = getattr(model, "mesh", None)
    cfg, dp = (mesh.size("cfg"), mesh.size("dp")) if mesh is not None else (1, 1)
    if cfg * dp == 1:
        return model.forward(x, sigma, cond)
    rows = x.shape[0]
    bounds = share_rows(rows, cfg * dp)
    start, stop = bounds[mesh.rank("dp") * cfg + mesh.rank("cfg")]
    rows_of = lambda v: [t[start:stop] for t in v] if isinstance(v, list) else v[start:stop]  # noqa: E731
    mine = model.forward(x[start:stop], sigma[start:stop], {k: rows_of(v) for k, v in cond.items()})
    most = max(stop - start for start, stop in bounds)
    if mine.shape[0] < most:  # all_gather needs one size: pad, and drop the padding below
        mine = torch.cat([mine, mine.new_zeros(most - mine.shape[0], *mine.shape[1:])])
    for axis in ("cfg", "dp"):  # after cfg within each dp group, then dp: shares in group order
        if mesh.size(axis) > 1:
            parts = [torch.empty_like(mine) for _ in range(mesh.size(axis))]
            dist.all_gather(parts, mine.contiguous(), group=mesh.group(axis))
            mine = torch.cat(parts)
    shares = [mine[g * most:g * most + stop - start] for g, (start, stop) in enumerate(bounds)]
    return torch.cat(shares[:min(rows, len(bounds))])  # groups past the row count repeated a row
