"""A DiT of any family as PipeFusion stages: the stage adapter over the family's block list, and the model
adapter sample() drives.

Each stage runs a contiguous range of the family's blocks (models/blocks.BlockLayout) on row patches of the
joint [text | image] sequence; attention keeps diffusers' projections (models/joint_attention.py) with the
attention call swapped for the stale-K/V one.
"""

from __future__ import annotations

import functools

import torch

from ..memory import stage_bounds
from ..models.dit import DiTModel, add_control, all_gather_seq, select_rope
from ..models.joint_attention import ShardState
from .pipeline import PipeFusionRunner, StageLink
from .schedule import Patch, PipeFusionOptions, row_patches, shard_patches
from .stale_kv import PatchWindow, StaleKVAttention


def token_index(patch: Patch, text_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(joint, text, image) indices into the full sequences that a patch holds (image counted from 0)."""
    joint = torch.cat([torch.arange(a, b) for a, b in patch.ranges])
    return joint, joint[:patch.text_len], joint[patch.text_len:] - text_len


def check_pipefusion(family) -> None:
    """A family whose blocks PipeFusion cannot split (Family.pipefusion False) is refused with the way out."""
    if not family.pipefusion:
        raise ValueError(f"PipeFusion cannot run {family.label} (its blocks pass tensors to later blocks that may "
                         "lie on another stage): load the model with another strategy (ulysses, ring, "
                         "cfg_parallel, data_parallel)")


class DiTStage:
    """Blocks [start, stop) of one transformer on this rank; every other block is dropped.

    With sequence parallelism inside the stage (model.mesh's ring/ulysses axes), each patch is this rank's
    slice of it (schedule.shard_patches), attention is USP over the slices' K/V buffers, and the last stage
    gathers the slices back into token order.
    """

    def __init__(self, model: DiTModel, start: int, stop: int):
        self.model, self.family, self.transformer = model, model.family, model.transformer
        layout = self.family.blocks
        n = len(layout.blocks(self.transformer))
        self.is_first, self.is_last = start == 0, stop == n
        self.start = start
        # fn(Step.control, image_index) -> per-block residuals, or None; set per call by a ControlNet
        self.control = None
        self.residuals = None
        self.mesh = model.mesh
        self.sp_degree = self.mesh.sp_degree if self.mesh is not None else 1
        self.window = PatchWindow()
        self._indices: dict[tuple, tuple] = {}
        self.blocks = layout.blocks(self.transformer)[start:stop]
        layout.keep_stage(self.transformer, start, stop)  # no-op on a stage-only load
        usp = model._shard.attention if model._shard is not None else None
        # cross-attention (text K/V are whole on every rank and never stale): the model's own (USP's cross path, or
        # the local kernel for a family whose processor runs on one rank too)
        cross = model._shard.cross if model._shard is not None else None
        self.states = []
        layer = 0
        for block in self.blocks:
            for module, image_only in self.family.attention_modules(block):
                stale_kv = StaleKVAttention(self.window, layer, attend=usp, image_only=image_only)
                state = ShardState(stale_kv, cross=cross)
                self.states.append(state)
                module.set_processor(self.family.processor(state, image_only=image_only))
                layer += 1

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def begin_step(self, x, sigma, cond):
        """DiTModel.forward's inputs; the same prologue on every stage (embedders only on the first)."""
        self.step = self.family.prologue(self.transformer, x, sigma, cond, embed=self.is_first)
        for state in self.states:
            state.image_context_len = self.step.extra.get("image_context_len", 0)
        # ControlNets run on the whole image, on every stage (each needs its blocks')
        self.residuals = None if self.control is None else self.control(self.step.control, slice(None))
        self.batch, self.latent_shape = x.shape[0], tuple(x.shape)

    def _index(self, patch: Patch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        text_len = 0 if self.family.cross_attention else self.step.text_len  # text in the patched sequence
        key = (patch, text_len)
        if key not in self._indices:
            self._indices[key] = tuple(t.to(self.device) for t in token_index(patch, text_len))
        return self._indices[key]

    def embed(self, patch: Patch) -> torch.Tensor:
        _, text, image = self._index(patch)
        h = self.step.image[:, image]
        return torch.cat([self.step.text[:, text], h], dim=1) if patch.text_len else h

    def run(self, h: torch.Tensor, patch: Patch) -> torch.Tensor:
        text, image = h[:, :patch.text_len], h[:, patch.text_len:]
        if self.family.cross_attention:  # patches hold image tokens only; every block cross-attends to all text
            text = self.step.text
        joint, _, image_index = self._index(patch)
        rope = select_rope(self.step.rope, joint)
        for i, block in enumerate(self.blocks, start=self.start):
            image, text = self.family.run_block(block, image, text, self.step, rope)
            image = add_control(image, self.residuals, i, image_index)
        if text is None or self.family.cross_attention:
            return image
        return torch.cat([text, image], dim=1)

    def head(self, h: torch.Tensor, patch: Patch) -> torch.Tensor:
        return self.family.head(self.transformer, h[:, h.shape[1] - (patch.size - patch.text_len):], self.step)

    def gather(self, out: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """This sp rank's image outputs -> the full sequence; order: every rank's image token indices in sp rank
        order (see PipeFusionModel.denoiser)."""
        for axis in ("ulysses", "ring"):  # sp rank order: ring-major, ulysses-minor
            if self.mesh.size(axis) > 1:
                out = all_gather_seq(out.contiguous(), self.mesh.group(axis))
        full = torch.empty_like(out)
        full[:, order] = out
        return full

    def activation(self, patch: Patch) -> torch.Tensor:
        width = self.family.width(self.model.config)
        return torch.empty(self.batch, patch.size, width, dtype=self.dtype, device=self.device)

    def output(self) -> torch.Tensor:
        rows, cols = self.family.token_grid(self.latent_shape)
        p = self.family.patch_size
        return torch.empty(self.batch, rows * cols, self.latent_shape[1] * p * p, dtype=self.dtype, device=self.device)


class _ForwardThrough:
    """The DiTModel as DiTModel.denoiser reads it, with forward routed through a pipeline runner."""

    def __init__(self, model: DiTModel, forward):
        self._model, self._forward = model, forward

    def forward(self, x, sigma, cond):
        return self._model.family.unpatchify(self._forward(x, sigma, cond), tuple(x.shape))

    def __getattr__(self, name):
        return getattr(self._model, name)


class PipeFusionModel:
    """A DiTModel run as this rank's PipeFusion stage of its mesh's "pp" axis: a model adapter for sample().

    Drops the blocks of the other stages from model.transformer (the model is this object's now).
    """

    def __init__(self, model: DiTModel, options: PipeFusionOptions = PipeFusionOptions()):
        mesh = model.mesh
        if mesh is None:
            raise ValueError("PipeFusion needs a mesh with a pipeline (pp) axis")
        check_pipefusion(model.family)
        self.model, self.mesh, self.options = model, mesh, options
        self.link = StageLink(mesh.group("pp"))
        options.validate(self.link.size, len(model.family.blocks.blocks(model.transformer)))
        # from the config (a stage-only load holds just its own blocks): the bounds the memory check planned
        self.stage_bounds = stage_bounds(model.family, model.config, self.link.size, options.stage_blocks)
        start, stop = self.stage_bounds[self.link.rank]
        self.stage = DiTStage(model, start, stop)

    def __getattr__(self, name):  # the rest of the adapter (variant, config, dtype, ...) is the model's
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def shift(self):
        return self.model.shift

    @shift.setter
    def shift(self, value):  # a ModelSampling* override reaches the model's sampling
        self.model.shift = value

    def check_latent(self, latent_shape: tuple[int, ...]) -> None:
        self.model.check_latent(latent_shape)
        rows, cols = self.model.family.token_grid(latent_shape)
        patches = self.options.num_pipeline_patch
        if patches > rows:
            raise ValueError(f"num_pipeline_patch {patches} exceeds the {rows} token rows of a "
                             f"{latent_shape[-1] * 8}x{latent_shape[-2] * 8} px image; use at most {rows}")
        sp = self.mesh.sp_degree
        if sp > 1:  # every patch splits over the stage's sequence-parallel ranks
            shard_patches(row_patches(0, rows, cols, patches), 0, sp, 0)

    def check_text(self, text_len: int) -> None:
        """Sequence parallelism inside a stage splits joint text too, so its length must divide the sp degree
        (cross-attention text is never split)."""
        if self.model.family.cross_attention:
            return
        shard_patches([Patch(0, text_len, text_len)], text_len, self.mesh.sp_degree, 0)

    def check_conditioning(self, cond: dict) -> None:
        self.model.check_conditioning(cond)
        extra = [n for n in self.model.family.extra_tokens if any(k == n or k.startswith(n + ".") for k in cond)]
        if extra:
            raise ValueError(f"PipeFusion cannot run {self.model.family.label} with {', '.join(extra)} (their tokens "
                             "lie outside the image's row patches): load the model with another strategy "
                             "(ulysses, ring, cfg_parallel) for this workflow")
        self.check_text(cond["context"].shape[1])

    def denoiser(self, cond: dict, latent_shape: tuple[int, ...]):
        self.check_latent(latent_shape)
        self.check_conditioning(cond)
        rows, cols = self.model.family.token_grid(latent_shape)
        text_len, sp = cond["context"].shape[1], self.mesh.sp_degree
        if self.model.family.cross_attention:  # the text is not in the pipelined sequence
            text_len = 0
        patches = row_patches(text_len, rows, cols, self.options.num_pipeline_patch)
        local = shard_patches(patches, text_len, sp, self.mesh.sp_rank)
        self.stage.window.text_len = local[0].text_len  # where image-only layers' buffers start
        gather = None
        if sp > 1:  # where each rank's image outputs go in the full sequence, in sp rank order
            order = torch.cat([token_index(p, text_len)[2] for r in range(sp)
                               for p in shard_patches(patches, text_len, sp, r)])
            gather = functools.partial(self.stage.gather, order=order.to(self.device))
        runner = PipeFusionRunner(self.stage, self.link, self.options, local, gather)
        return DiTModel.denoiser(_ForwardThrough(self.model, runner), cond, latent_shape)
