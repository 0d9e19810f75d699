"""PipeFusion options, stage balancing and the row-patch split: pure arithmetic, no process groups."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PipeFusionOptions:
    """num_pipeline_patch: row patches per step (M); warmup_steps: synchronous full-K/V steps first.

    stage_blocks: blocks per stage (in block order), or None to balance by parameter count.
    With warmup_steps >= steps every step is synchronous and the result equals the serial one.
    """

    num_pipeline_patch: int = 2
    warmup_steps: int = 1
    stage_blocks: tuple[int, ...] | None = None

    def validate(self, num_stages: int, num_blocks: int) -> "PipeFusionOptions":
        if self.num_pipeline_patch < 1:
            raise ValueError(f"num_pipeline_patch must be at least 1, got {self.num_pipeline_patch}")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1 (the stale K/V buffers are filled by a full step), "
                             f"got {self.warmup_steps}")
        if num_blocks < num_stages:
            raise ValueError(f"{num_blocks} transformer blocks cannot fill {num_stages} pipeline stages; "
                             f"use pipefusion_degree <= {num_blocks}")
        if self.stage_blocks is not None:
            counts = tuple(self.stage_blocks)
            if len(counts) != num_stages or sum(counts) != num_blocks or min(counts) < 1:
                raise ValueError(f"stage_blocks {counts} must give each of the {num_stages} stages at least one "
                                 f"block and add up to the model's {num_blocks} blocks")
        return self


def balance_stages(costs: list[int], num_stages: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) block ranges, one per stage, minimising the largest stage cost.

    Exact (dynamic programming, O(n^2 p)); the optimum is at most sum/p + max(costs).
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} blocks into {num_stages} non-empty stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: smallest achievable max cost putting the first i blocks on s stages; cut[s][i]: last cut
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, stop = [], n
    for s in range(num_stages, 0, -1):
        start = cut[s][stop]
        bounds.append((start, stop))
        stop = start
    return bounds[::-1]


def stage_ranges(costs: list[int], num_stages: int, stage_blocks: tuple[int, ...] | None) -> list[tuple[int, int]]:
    if stage_blocks is None:
        return balance_stages(costs, num_stages)
    bounds, start = [], 0
    for count in stage_blocks:
        bounds.append((start, start + count))
        start += count
    return bounds


@dataclass(frozen=True)
class Patch:
    """A contiguous range [start, stop) of a rank's joint [text | image] token sequence; text_len text
    tokens lead it. source: the ranges of the full joint sequence it holds, in order, where sequence
    parallelism inside a stage gives each rank a slice of every patch; () means [start, stop) itself."""

    start: int
    stop: int
    text_len: int
    source: tuple[tuple[int, int], ...] = ()

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return self.source or ((self.start, self.stop),)


def row_patches(text_len: int, token_rows: int, tokens_per_row: int, num_patches: int) -> list[Patch]:
    """num_patches bands of whole token rows (the first ones one row taller when uneven); the text rides
    with the first band, so its K/V is fresh for every later patch of the step."""
    if not 1 <= num_patches <= token_rows:
        raise ValueError(f"num_pipeline_patch {num_patches} must be between 1 and the latent's {token_rows} "
                         f"token rows (latent height / 2)")
    base, extra = divmod(token_rows, num_patches)
    patches, row = [], 0
    for i in range(num_patches):
        rows = base + (1 if i < extra else 0)
        start = 0 if i == 0 else text_len + row * tokens_per_row
        stop = text_len + (row + rows) * tokens_per_row
        patches.append(Patch(start, stop, text_len if i == 0 else 0))
        row += rows
    return patches


def whole_step(patches: list[Patch]) -> Patch:
    """The patches as one: what a synchronous (warmup) step runs, in the same token order, so the K/V
    buffer it fills lines up with the patched steps' positions."""
    ranges: list[tuple[int, int]] = []
    for a, b in (r for p in patches for r in p.ranges):
        if ranges and ranges[-1][1] == a:  # adjacent ranges merge: without sharding this is [0, stop)
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((a, b))
    return Patch(patches[0].start, patches[-1].stop, patches[0].text_len, tuple(ranges))


def shard_patches(patches: list[Patch], text_len: int, degree: int, rank: int) -> list[Patch]:
    """This rank's slice of every patch, for sequence parallelism of `degree` inside a stage.

    Rank r holds text slice r and image slice r of each patch; its patches are contiguous in its own
    local sequence [text slice | patch 0 slice | patch 1 slice | ...], which is the layout of its K/V
    buffer. Attention has no mask and RoPE is applied per token, so which rank holds a token does
    not change the result.
    """
    if degree == 1:
        return patches
    if text_len % degree:
        raise ValueError(f"PipeFusion with sequence parallel degree {degree} inside each stage needs the text "
                         f"length ({text_len} tokens) to divide by {degree}; use ring_degree = ulysses_degree = 1 "
                         f"with pipefusion, or a prompt whose token count divides by {degree}")
    local, offset = [], 0
    for i, p in enumerate(patches):
        first_image = max(p.start, text_len)
        image = p.stop - first_image
        if image % degree:
            raise ValueError(f"pipeline patch {i} has {image} image tokens, which do not split over sequence "
                             f"parallel degree {degree}; choose num_pipeline_patch so that each patch's token "
                             f"rows x columns divide by {degree}")
        ranges = []
        if p.text_len:
            t = text_len // degree
            ranges.append((rank * t, (rank + 1) * t))
        n = image // degree
        ranges.append((first_image + rank * n, first_image + (rank + 1) * n))
        size = sum(b - a for a, b in ranges)
        local.append(Patch(offset, offset + size, p.text_len // degree, tuple(ranges)))
        offset += size
    return local
