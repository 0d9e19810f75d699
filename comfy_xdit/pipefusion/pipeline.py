"""The PipeFusion step: patches flow stage to stage over the "pp" axis; every rank returns the full output.

Model-free: a stage adapter (see flux.py here) embeds, runs its blocks and applies the head on
joint token ranges; this module owns the patch schedule, the P2P traffic and the warmup rule.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from .schedule import Patch, PipeFusionOptions, whole_step
from .stale_kv import PatchWindow


class PipelineStage(Protocol):
    """What a model adapter gives the runner for the blocks resident on this rank."""

    is_first: bool
    is_last: bool
    window: PatchWindow

    def begin_step(self, *step_inputs) -> None: ...          # per-step conditioning (temb, RoPE, text)
    def embed(self, patch: Patch) -> torch.Tensor: ...        # first stage: the patch's joint activations
    def run(self, h: torch.Tensor, patch: Patch) -> torch.Tensor: ...  # this stage's blocks
    def head(self, h: torch.Tensor, patch: Patch) -> torch.Tensor: ...  # last stage: the image tokens' output
    def activation(self, patch: Patch) -> torch.Tensor: ...   # empty buffer shaped like a patch's activations
    def output(self) -> torch.Tensor: ...                     # empty buffer shaped like the full output


class StageLink:
    """P2P to the neighbouring stages and the final broadcast, within one "pp" group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def recv(self, buffer: torch.Tensor, tag: int):
        return dist.irecv(buffer, group=self.group, group_src=self.rank - 1, tag=tag)

    def send(self, tensor: torch.Tensor, tag: int):
        return dist.isend(tensor, group=self.group, group_dst=self.rank + 1, tag=tag)

    def broadcast_from_last(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, group=self.group, group_src=self.size - 1)


class PipeFusionRunner:
    """One denoiser's forward: call it once per sampling step with the stage's step inputs.

    Steps before options.warmup_steps run as one full-sequence patch (exactly the serial
    computation, and they fill the K/V buffers); later steps run the row patches through the
    stages with stale K/V. Owns its K/V cache, so each denoiser keeps its own. `patches` are this
    rank's (see schedule.shard_patches when a stage is sequence parallel); gather turns the last
    stage's outputs for them into the full output (None: they already are).
    """

    def __init__(self, stage: PipelineStage, link: StageLink, options: PipeFusionOptions, patches: list[Patch],
                 gather=None):
        self.stage, self.link, self.options, self.patches = stage, link, options, patches
        self.gather = gather
        self.full_patch = whole_step(patches)
        self.cache: dict = {}
        self.step = 0

    def __call__(self, *step_inputs) -> torch.Tensor:
        full = self.step < self.options.warmup_steps
        self.step += 1
        self.stage.begin_step(*step_inputs)
        return self._run([self.full_patch] if full else self.patches, full)

    def _run(self, patches: list[Patch], full: bool) -> torch.Tensor:
        stage, link, window = self.stage, self.link, self.stage.window
        window.cache, window.full = self.cache, full
        # every receive posted before any send: no stage can wait on a peer that waits on it, at any degree
        recvs = [] if stage.is_first else [(buf, link.recv(buf, tag)) for tag, buf in
                                           enumerate(stage.activation(p) for p in patches)]
        sends, outputs = [], []
        for tag, patch in enumerate(patches):
            if stage.is_first:
                h = stage.embed(patch)
            else:
                h, work = recvs[tag]
                work.wait()
            window.start, window.stop = patch.start, patch.stop
            h = stage.run(h, patch)
            if stage.is_last:
                outputs.append(stage.head(h, patch))
            else:
                h = h.contiguous()
                sends.append((h, link.send(h, tag)))  # the tensor is kept alive until its send completes
        for _, work in sends:
            work.wait()
        if stage.is_last:
            out = torch.cat(outputs, dim=1)
            out = (self.gather(out) if self.gather is not None else out).contiguous()
        else:
            out = stage.output()
        if link.size > 1:
            link.broadcast_from_last(out)
        return out
