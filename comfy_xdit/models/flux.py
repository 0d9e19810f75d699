"""Flux.1 adapter: latent packing, RoPE ids, the sequence-parallel forward and attention hook.

Loading and key mapping live in flux_checkpoint.py. The attention hook replaces only the
attention processor (projections, norms, RoPE, then USP attention); the blocks' forwards
stay diffusers' own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (FluxAttention, FluxTransformer2DModel,
                                                           _get_qkv_projections)

from ..attention.kernels import default_kernel_name, get_kernel
from ..attention.usp import USPAttention
from ..mesh import ParallelMesh
from ..sampling import LatentFormat, flux_shift_mu
from .flux_checkpoint import flux_variant, load_flux_transformer

FLUX_LATENT = LatentFormat(channels=16, scale=0.3611, shift=0.1159)
PATCH = 2  # Flux packs 2x2 latent pixels into one token
DEFAULT_GUIDANCE = 3.5


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C], row-major tokens (BFL's rearrange)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.view(b, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """RoPE position ids (0, row, col) per image token, for a latent of h x w."""
    ids = torch.zeros(h // PATCH, w // PATCH, 3)
    ids[..., 1] = torch.arange(h // PATCH)[:, None]
    ids[..., 2] = torch.arange(w // PATCH)[None, :]
    return ids.reshape(-1, 3)


@dataclass
class _SequenceShardState:
    """Per-forward facts the attention processors need; set by the forward wrapper."""

    attention: USPAttention
    replicated_text_len: int = 0


class _USPFluxAttnProcessor:
    """diffusers' FluxAttnProcessor with the attention call swapped for USP attention."""

    def __init__(self, state: _SequenceShardState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported under sequence parallelism")
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        out = self.state.attention(q, k, v, replicated_text_len=self.state.replicated_text_len)
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        encoder_out, out = out[:, :text_len], out[:, text_len:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_out.contiguous())


class FluxModel:
    """A loaded Flux transformer on one rank, run under the given mesh."""

    latent_format = FLUX_LATENT

    def __init__(self, transformer: FluxTransformer2DModel, mesh: ParallelMesh | None = None,
                 attention_kernel: str | None = None, info=None):
        self.transformer = transformer.eval().requires_grad_(False)
        self.mesh = mesh
        self.info = info
        self.config = dict(transformer.config)
        self.variant = flux_variant(self.config)
        self._shard_state = None
        if mesh is not None and mesh.sp_degree > 1:
            mesh.config.validate(num_heads=self.config["num_attention_heads"])
            dtype = next(transformer.parameters()).dtype
            kernel = get_kernel(attention_kernel or default_kernel_name(mesh.device, dtype))
            attention = USPAttention(mesh.group("ulysses"), mesh.group("ring"), kernel)
            self._shard_state = _SequenceShardState(attention)
            for module in transformer.modules():
                if isinstance(module, FluxAttention):
                    module.set_processor(_USPFluxAttnProcessor(self._shard_state))

    @classmethod
    def load(cls, path, dtype=torch.bfloat16, mesh: ParallelMesh | None = None,
             attention_kernel: str | None = None, device=None) -> "FluxModel":
        """Load a checkpoint onto the mesh's device (or `device`, default CPU, without a mesh)."""
        device = mesh.device if mesh is not None else torch.device(device or "cpu")
        transformer, info = load_flux_transformer(path, dtype=dtype, device=device)
        return cls(transformer, mesh, attention_kernel, info)

    def compile_blocks(self, backend: str = "inductor") -> None:
        """Regional torch.compile: each transformer block on its own (one graph per block type, reused
        across the 57 blocks). Ulysses attention is traced into the graph; Ring's loop and PipeFusion's
        stale K/V stay eager between graphs (see USPAttention, StaleKVAttention). Dropped blocks
        (Identity, on another PipeFusion stage) are left alone."""
        # Coordinate-descent tuning of inductor's own kernels (norms, RoPE, packing): measured 1.5% off a
        # 1024px forward on 2 GPUs and 0.9% at 2048px, paid once at compile time (BENCHMARKS.md).
        options = {"coordinate_descent_tuning": True} if backend == "inductor" else None
        for block in list(self.transformer.transformer_blocks) + list(self.transformer.single_transformer_blocks):
            if not isinstance(block, torch.nn.Identity):
                block.compile(backend=backend, fullgraph=False, dynamic=False, options=options)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def time_shift_mu(self, latent_shape: tuple[int, ...]) -> float:
        if self.variant == "schnell":
            return 1.0
        h, w = latent_shape[-2:]
        return flux_shift_mu((h // PATCH) * (w // PATCH))

    def check_latent(self, latent_shape: tuple[int, ...]) -> None:
        b, c, h, w = latent_shape
        if c != self.latent_format.channels:
            raise ValueError(f"Flux latents have {self.latent_format.channels} channels, got {c} "
                             f"(use EmptySD3LatentImage, not EmptyLatentImage)")
        if h % PATCH or w % PATCH:
            raise ValueError(f"latent {h}x{w} is not even: Flux needs image sizes that are multiples of 16 px "
                             f"(got {w * 8}x{h * 8})")
        tokens = (h // PATCH) * (w // PATCH)
        sp = self.mesh.sp_degree if self.mesh is not None else 1
        if tokens % sp:
            raise ValueError(f"{w * 8}x{h * 8} px gives {tokens} image tokens, which do not split evenly over "
                             f"sequence-parallel degree {sp}; pick a size whose token count divides by {sp}")

    def check_text(self, text_len: int) -> None:
        """Any text length runs: one that does not split over the sp degree is replicated (see USPAttention)."""

    def forward(self, hidden_states, encoder_hidden_states, pooled, timestep, img_ids, txt_ids, guidance=None):
        """Transformer forward on full (unsharded) inputs; returns the full output on every rank."""
        call = dict(pooled_projections=pooled, timestep=timestep, guidance=guidance, return_dict=False)
        if self._shard_state is None:
            return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                    img_ids=img_ids, txt_ids=txt_ids, **call)[0]
        sp, shard = self.mesh.sp_degree, self.mesh.sp_rank
        if hidden_states.shape[1] % sp:
            raise ValueError(f"{hidden_states.shape[1]} image tokens do not split over sp degree {sp}")
        hidden_states = hidden_states.chunk(sp, dim=1)[shard]
        img_ids = img_ids.chunk(sp, dim=0)[shard]
        text_len = encoder_hidden_states.shape[1]
        if text_len % sp == 0:  # text splits with the image tokens; RoPE ids the same way
            encoder_hidden_states = encoder_hidden_states.chunk(sp, dim=1)[shard]
            txt_ids = txt_ids.chunk(sp, dim=0)[shard]
            self._shard_state.replicated_text_len = 0
        else:
            self._shard_state.replicated_text_len = text_len
        out = self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                               img_ids=img_ids, txt_ids=txt_ids, **call)[0]
        # Shard index is ring-major, ulysses-minor: gather ulysses first, then ring.
        for axis in ("ulysses", "ring"):
            if self.mesh.size(axis) > 1:
                out = _all_gather_seq(out.contiguous(), self.mesh.group(axis))
        return out

    def denoiser(self, context: torch.Tensor, pooled: torch.Tensor, guidance: float | None,
                 latent_shape: tuple[int, ...]):
        """fn(x, sigma) -> x0 prediction for model-space latents of latent_shape."""
        self.check_latent(latent_shape)
        b, _, h, w = latent_shape
        device, dtype = self.device, self.dtype
        context = _batch(context, b).to(device, dtype)
        pooled = _batch(pooled, b).to(device, dtype)
        img_ids = image_ids(h, w).to(device, dtype)
        txt_ids = torch.zeros(context.shape[1], 3, device=device, dtype=dtype)
        guidance_t = None
        if self.config.get("guidance_embeds"):
            g = DEFAULT_GUIDANCE if guidance is None else guidance
            guidance_t = torch.full((b,), g, device=device, dtype=torch.float32)

        @torch.inference_mode()
        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            timestep = torch.full((b,), sigma, device=device, dtype=torch.float32)
            packed = pack_latents(x.to(device, dtype))
            v = self.forward(packed, context, pooled, timestep, img_ids, txt_ids, guidance_t)
            v = unpack_latents(v.float(), h, w).to(x.device)
            return x - v * sigma

        return denoise


def _batch(t: torch.Tensor, b: int) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if b % t.shape[0]:
        raise ValueError(f"conditioning batch {t.shape[0]} does not divide latent batch {b}")
    return t.repeat(b // t.shape[0], *([1] * (t.dim() - 1)))


def _all_gather_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    chunks = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(chunks, x, group=group)
    return torch.cat(chunks, dim=1)
