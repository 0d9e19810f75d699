"""Flux.1 as PipeFusion stages: the block list, per-stage residency, and the stage adapter.

Blocks run in order 19 double then 38 single (at full size); both kinds take and return
(text, image) hidden states, so a stage is a plain loop over its range. Attention keeps
diffusers' projections and RoPE (flux.py's processor) with the attention call swapped for the
stale-K/V one.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxTransformer2DModel

from ..models.flux_checkpoint import EMBEDDERS, HEAD, keep_stage
from ..models.flux import PATCH, FluxModel, _all_gather_seq, _SequenceShardState, _USPFluxAttnProcessor
from .pipeline import PipeFusionRunner, StageLink
from .schedule import Patch, PipeFusionOptions, row_patches, shard_patches
from .stale_kv import PatchWindow, StaleKVAttention



def _numel(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def flux_blocks(transformer: FluxTransformer2DModel) -> list[torch.nn.Module]:
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def flux_block_costs(transformer: FluxTransformer2DModel) -> list[int]:
    """Parameters per block, the embedders counted on the first block and the head on the last
    (works on a meta-device model, so a loader can plan residency before reading weights)."""
    costs = [_numel(b) for b in flux_blocks(transformer)]
    costs[0] += sum(_numel(getattr(transformer, n)) for n in EMBEDDERS)
    costs[-1] += sum(_numel(getattr(transformer, n)) for n in HEAD)
    return costs


def token_index(patch: Patch, text_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(joint, text, image) indices into the full sequences that a patch holds (image counted from 0)."""
    joint = torch.cat([torch.arange(a, b) for a, b in patch.ranges])
    return joint, joint[:patch.text_len], joint[patch.text_len:] - text_len


class FluxStage:
    """Blocks [start, stop) of one Flux transformer on this rank; every other block is dropped.

    With sequence parallelism inside the stage (model.mesh's ring/ulysses axes), each patch is this
    rank's slice of it (schedule.shard_patches), attention is USP over the slices' K/V buffers, and
    the last stage gathers the slices back into token order.
    """

    def __init__(self, transformer: FluxTransformer2DModel, start: int, stop: int, model: FluxModel | None = None):
        self.transformer = transformer
        self.is_first, self.is_last = start == 0, stop == len(flux_blocks(transformer))
        self.start, self.num_double = start, len(transformer.transformer_blocks)
        # fn(transformer call kwargs) -> (double, single) residuals per block, or None; set by ControlledFluxModel
        self.control = None
        self.residuals = None
        self.mesh = model.mesh if model is not None else None
        self.sp_degree = self.mesh.sp_degree if self.mesh is not None else 1
        self.window = PatchWindow()
        self._indices: dict[tuple, tuple] = {}
        self.width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.out_channels = transformer.out_channels * transformer.config.patch_size ** 2
        self.blocks = flux_blocks(transformer)[start:stop]
        keep_stage(transformer, start, stop)  # no-op on a stage-only load; time_text_embed stays (tiny)
        usp = model._shard_state.attention if self.sp_degree > 1 else None
        layers = [m for block in self.blocks for m in block.modules() if isinstance(m, FluxAttention)]
        for layer, attn in enumerate(layers):
            stale_kv = StaleKVAttention(self.window, layer, attend=usp)
            attn.set_processor(_USPFluxAttnProcessor(_SequenceShardState(stale_kv)))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def begin_step(self, hidden_states, encoder_hidden_states, pooled, timestep, img_ids, txt_ids, guidance=None):
        """FluxModel.forward's inputs; the same conditioning diffusers' forward computes, on every stage."""
        t, dtype = self.transformer, self.dtype
        self.residuals = None if self.control is None else self.control(dict(
            hidden_states=hidden_states, timestep=timestep, img_ids=img_ids, pooled_projections=pooled,
            guidance=guidance))  # ControlNets run on the whole image, on every stage (each needs its blocks')
        timestep = timestep.to(dtype) * 1000
        self.temb = (t.time_text_embed(timestep, pooled) if guidance is None
                     else t.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled))
        self.rope = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        self.batch, self.text_len, self.image_len = hidden_states.shape[0], txt_ids.shape[0], img_ids.shape[0]
        if self.is_first:
            self.image_tokens = hidden_states
            self.text = t.context_embedder(encoder_hidden_states)

    def _index(self, patch: Patch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (patch, self.text_len)
        if key not in self._indices:
            self._indices[key] = tuple(t.to(self.device) for t in token_index(patch, self.text_len))
        return self._indices[key]

    def embed(self, patch: Patch) -> torch.Tensor:
        _, text, image = self._index(patch)
        h = self.transformer.x_embedder(self.image_tokens[:, image])
        return torch.cat([self.text[:, text], h], dim=1) if patch.text_len else h

    def run(self, h: torch.Tensor, patch: Patch) -> torch.Tensor:
        text, image = h[:, :patch.text_len], h[:, patch.text_len:]
        joint, _, image_index = self._index(patch)
        rope = tuple(r[joint] for r in self.rope)
        for i, block in enumerate(self.blocks, start=self.start):
            text, image = block(hidden_states=image, encoder_hidden_states=text, temb=self.temb,
                                image_rotary_emb=rope)
            if self.residuals is not None:  # after block i, as diffusers adds a ControlNet's residual i
                double, single = self.residuals
                samples, j = (double, i) if i < self.num_double else (single, i - self.num_double)
                if samples is not None:
                    image = image + samples[j][:, image_index]
        return torch.cat([text, image], dim=1)

    def head(self, h: torch.Tensor, patch: Patch) -> torch.Tensor:
        return self.transformer.proj_out(self.transformer.norm_out(h[:, patch.text_len:], self.temb))

    def gather(self, out: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """This sp rank's image outputs -> the full sequence; order: every rank's image token indices in
        sp rank order (see FluxPipeFusion.denoiser)."""
        for axis in ("ulysses", "ring"):  # sp rank order: ring-major, ulysses-minor
            if self.mesh.size(axis) > 1:
                out = _all_gather_seq(out.contiguous(), self.mesh.group(axis))
        full = torch.empty_like(out)
        full[:, order] = out
        return full

    def activation(self, patch: Patch) -> torch.Tensor:
        return torch.empty(self.batch, patch.size, self.width, dtype=self.dtype, device=self.device)

    def output(self) -> torch.Tensor:
        return torch.empty(self.batch, self.image_len, self.out_channels, dtype=self.dtype, device=self.device)


class _ForwardThrough:
    """The FluxModel as FluxModel.denoiser reads it, with forward routed through a pipeline runner."""

    def __init__(self, model: FluxModel, forward):
        self._model, self.forward = model, forward

    def __getattr__(self, name):
        return getattr(self._model, name)


class FluxPipeFusion:
    """A FluxModel run as this rank's PipeFusion stage of its mesh's "pp" axis: a model adapter for sample().

    Drops the blocks of the other stages from model.transformer (the model is this object's now).
    """

    def __init__(self, model: FluxModel, options: PipeFusionOptions = PipeFusionOptions()):
        mesh = model.mesh
        if mesh is None:
            raise ValueError("PipeFusion needs a mesh with a pipeline (pp) axis")
        self.model, self.mesh, self.options = model, mesh, options
        self.link = StageLink(mesh.group("pp"))
        transformer = model.transformer
        options.validate(self.link.size, len(flux_blocks(transformer)))
        from ..memory import flux_stage_bounds  # here: memory imports this module

        # from the config (a stage-only load holds just its own blocks); the bounds the memory check planned
        self.stage_bounds = flux_stage_bounds(dict(transformer.config), self.link.size, options.stage_blocks)
        start, stop = self.stage_bounds[self.link.rank]
        self.stage = FluxStage(transformer, start, stop, model)

    latent_format = FluxModel.latent_format

    def __getattr__(self, name):  # the rest of the adapter (variant, config, dtype, ...) is the model's
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def time_shift_mu(self, latent_shape: tuple[int, ...]) -> float:
        return self.model.time_shift_mu(latent_shape)

    def check_latent(self, latent_shape: tuple[int, ...]) -> None:
        self.model.check_latent(latent_shape)
        rows, patches = latent_shape[-2] // PATCH, self.options.num_pipeline_patch
        if patches > rows:
            raise ValueError(f"num_pipeline_patch {patches} exceeds the {rows} token rows of a "
                             f"{latent_shape[-1] * 8}x{latent_shape[-2] * 8} px image; use at most {rows}")
        sp = self.mesh.sp_degree
        if sp > 1:  # every patch splits over the stage's sequence-parallel ranks
            shard_patches(row_patches(0, rows, latent_shape[-1] // PATCH, patches), 0, sp, 0)

    def check_text(self, text_len: int) -> None:
        """Sequence parallelism inside a stage splits the text too, so its length must divide the sp degree."""
        shard_patches([Patch(0, text_len, text_len)], text_len, self.mesh.sp_degree, 0)

    def denoiser(self, context: torch.Tensor, pooled: torch.Tensor, guidance: float | None,
                 latent_shape: tuple[int, ...]):
        self.check_latent(latent_shape)
        h, w = latent_shape[-2:]
        text_len, sp = context.shape[1], self.mesh.sp_degree
        patches = row_patches(text_len, h // PATCH, w // PATCH, self.options.num_pipeline_patch)
        local = shard_patches(patches, text_len, sp, self.mesh.sp_rank)
        gather = None
        if sp > 1:  # where each rank's image outputs go in the full sequence, in sp rank order
            order = torch.cat([token_index(p, text_len)[2] for r in range(sp)
                               for p in shard_patches(patches, text_len, sp, r)])
            gather = functools.partial(self.stage.gather, order=order.to(self.device))
        runner = PipeFusionRunner(self.stage, self.link, self.options, local, gather)
        return FluxModel.denoiser(_ForwardThrough(self.model, runner), context, pooled, guidance, latent_shape)
