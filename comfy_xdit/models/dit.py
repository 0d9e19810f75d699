"""A loaded DiT of any family on one rank, run under a mesh: the sequence-parallel forward and the denoiser.

prologue on the full sequence -> this rank's shard of the tokens -> the blocks (attention through USP) ->
head per token -> gather over the sequence-parallel ranks -> unpatchify. The text splits with the image
tokens when its length divides the sp degree, else every rank holds it whole (see attention/usp.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..attention.kernels import default_kernel_name, get_kernel
from ..attention.usp import USPAttention
from ..mesh import ParallelMesh
from .family import Family, Step
from .joint_attention import JointAttnProcessor, ShardState


def install_processors(family: Family, blocks, attention) -> None:
    """Route every attention module of `blocks` through `attention` (one ShardState shared by them all)."""
    for block in blocks:
        if isinstance(block, torch.nn.Identity):  # another PipeFusion stage's block
            continue
        for module, image_only in family.attention_modules(block):
            module.set_processor(family.processor(attention, image_only=image_only))


def select_rope(rope, index):
    """The RoPE rows of the joint tokens at `index` (a slice or an index tensor)."""
    return None if rope is None else tuple(r[index] for r in rope)


def add_control(image: torch.Tensor, residuals, i: int, image_index=slice(None)) -> torch.Tensor:
    """After block i, a ControlNet's residual (diffusers' rule), at image_index of the residuals' tokens."""
    if residuals is None or residuals[i] is None:
        return image
    return image + residuals[i][:, image_index]


class DiTModel:
    """A transformer of `family` on this rank; the model adapter sample() drives (see sampling.sample)."""

    def __init__(self, family: Family, transformer, mesh: ParallelMesh | None = None,
                 attention_kernel: str | None = None, info=None):
        self.family = family
        self.transformer = transformer.eval().requires_grad_(False)
        self.mesh = mesh
        self.info = info
        self.config = dict(transformer.config)
        self.variant = family.variant(self.config)
        self.latent_format = family.latent_format_for(self.config)
        self.shift = None  # a ModelSampling* node's override of the family's shift
        # fn(Step.control, image_index) -> per-block residuals for those image tokens, or None; set per call by a
        # ControlNet
        self.control = None
        self._shard = None
        self._usp = None
        sharded = mesh is not None and mesh.sp_degree > 1
        if sharded or family.own_processors:  # on one rank too for a family with its own processor (local kernel)
            device = mesh.device if mesh is not None else self.device
            kernel = get_kernel(attention_kernel or default_kernel_name(device, self.dtype))
            self._whole = lambda q, k, v, replicated_text_len=0: kernel(q, k, v, need_lse=False)[0]
            self._shard = ShardState(self._whole, cross=self._whole)
            if sharded:
                mesh.config.validate(num_heads=family.num_heads(self.config))
                self._usp = USPAttention(mesh.group("ulysses"), mesh.group("ring"), kernel)
                self._shard = ShardState(self._usp, cross=self._usp.cross)
            install_processors(family, family.blocks.blocks(transformer), self._shard)

    @classmethod
    def load(cls, path, dtype=torch.bfloat16, mesh: ParallelMesh | None = None, attention_kernel: str | None = None,
             device=None) -> "DiTModel":
        """Load a checkpoint of any known family onto the mesh's device (or `device`, default CPU)."""
        from .family import detect_family

        family, _ = detect_family(path)
        device = mesh.device if mesh is not None else torch.device(device or "cpu")
        transformer, info = family.load(path, dtype=dtype, device=device)
        return cls(family, transformer, mesh, attention_kernel, info)

    def compile_blocks(self, backend: str = "inductor") -> None:
        """Regional torch.compile: each block on its own (one graph per block type, reused across blocks).
        Ulysses attention is traced into the graph; Ring's loop and PipeFusion's stale K/V stay eager between
        graphs (see USPAttention, StaleKVAttention). Dropped blocks (another PipeFusion stage's) are left alone."""
        # Coordinate-descent tuning of inductor's own kernels (norms, RoPE, packing): measured 1.5% off a
        # Flux 1024px forward on 2 GPUs and 0.9% at 2048px, paid once at compile time (BENCHMARKS.md).
        options = {"coordinate_descent_tuning": True} if backend == "inductor" else None
        for block in self.family.blocks.blocks(self.transformer):
            if not isinstance(block, torch.nn.Identity):
                block.compile(backend=backend, fullgraph=False, dynamic=False, options=options)
        self.transformer.compiled_blocks = True  # a family's prologue may pick inputs that compile better

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def model_sampling(self, latent_shape: tuple):
        return self.family.model_sampling(self.config, latent_shape, self.shift)

    def check_latent(self, latent_shape: tuple) -> None:
        self.family.check_latent(self.config, latent_shape)
        rows, cols = self.family.token_grid(latent_shape)
        sp = self.mesh.sp_degree if self.mesh is not None else 1
        if (rows * cols) % sp:
            h, w = latent_shape[-2:]
            if len(latent_shape) == 5:
                raise ValueError(f"a latent of {latent_shape[2]} frames x {w}x{h} gives {rows * cols} video tokens, "
                                 f"which do not split evenly over sequence-parallel degree {sp}; pick a size or "
                                 f"length whose token count divides by {sp}")
            raise ValueError(f"{w * 8}x{h * 8} px gives {rows * cols} image tokens, which do not split evenly over "
                             f"sequence-parallel degree {sp}; pick a size whose token count divides by {sp}")

    def check_text(self, text_len: int) -> None:
        """Any text length runs: one that does not split over the sp degree is replicated (see USPAttention)."""

    def check_conditioning(self, cond: dict) -> None:
        missing = [n for n in self.family.conditioning if n not in cond]
        if missing:
            hint = (" (a pooled output: encode the prompt with the model's own text encoders, e.g. Flux: "
                    "DualCLIPLoader type flux; SD3: TripleCLIPLoader; then CLIPTextEncode)" if "pooled" in missing
                    else "")
            raise ValueError(f"{self.family.label} needs conditioning {', '.join(missing)}{hint}; got "
                             f"{', '.join(sorted(cond)) or 'none'}")
        self.check_text(cond["context"].shape[1])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        """The model's prediction for model-space x [B, C, h, w] at sigma [B]; full output on every rank."""
        family, t = self.family, self.transformer
        step = family.prologue(t, x, sigma, cond)
        # A token count that does not split over the sp ranks (a ComfyUI area crop on the stepwise path; the
        # Sampler (xDiT) refuses such sizes first, in check_latent) runs whole on every rank.
        split = self._usp is not None and step.image_len % self.mesh.sp_degree == 0
        if not split:
            image, text, image_index, rope = step.image, step.text, slice(None), step.rope
        else:
            image, text, image_index, rope = self._shard_tokens(step)
        if self._shard is not None:
            self._shard.attention = self._usp if split else self._whole
            self._shard.cross = self._usp.cross if split else self._whole
            self._shard.image_context_len = step.extra.get("image_context_len", 0)
            if not split:
                self._shard.replicated_text_len = 0
        residuals = self.control(step.control, image_index) if self.control is not None else None
        for i, block in enumerate(family.blocks.blocks(t)):
            image, text = family.run_block(block, image, text, step, rope)
            image = add_control(image, residuals, i)
        out = family.head(t, image, step)
        if split:
            # Shard index is ring-major, ulysses-minor: gather ulysses first, then ring.
            for axis in ("ulysses", "ring"):
                if self.mesh.size(axis) > 1:
                    out = all_gather_seq(out.contiguous(), self.mesh.group(axis))
        return family.unpatchify(out, tuple(x.shape))

    def _shard_tokens(self, step: Step):
        """This rank's contiguous shard of the image tokens, and of the text when its length divides the sp
        degree (else the whole text, replicated); RoPE rows the same way."""
        sp, shard = self.mesh.sp_degree, self.mesh.sp_rank
        n, t = step.image_len // sp, step.text_len
        image_index = slice(shard * n, (shard + 1) * n)
        image = step.image[:, image_index]
        if self.family.cross_attention:  # the text stays whole on every rank; RoPE rows are the image tokens'
            self._shard.replicated_text_len = 0
            return image, step.text, image_index, select_rope(step.rope, image_index)
        if t % sp == 0:
            text_index = slice(shard * (t // sp), (shard + 1) * (t // sp))
            self._shard.replicated_text_len = 0
        else:
            text_index = slice(0, t)
            self._shard.replicated_text_len = t
        text = step.text[:, text_index]
        rope = None
        if step.rope is not None:
            joint = torch.cat([torch.arange(t)[text_index], t + torch.arange(step.image_len)[image_index]])
            rope = select_rope(step.rope, joint.to(step.rope[0].device))
        return image, text, image_index, rope

    def denoiser(self, cond: dict, latent_shape: tuple):
        """fn(x, sigma) -> x0 prediction for model-space latents of latent_shape."""
        self.check_latent(latent_shape)
        self.check_conditioning(cond)
        cond = self.family.prepare_conditioning(self.config, dict(cond), latent_shape)
        b = latent_shape[0]
        device, dtype = self.device, self.dtype
        cond = {k: _to_rows(v, b, device, dtype) for k, v in cond.items()}
        sampling = self.model_sampling(latent_shape)

        @torch.inference_mode()
        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            timestep = torch.full((b,), sigma, device=device, dtype=torch.float32)
            xc = sampling.calculate_input(sigma, x)  # x itself for flow models; x / sqrt(sigma^2 + 1) for eps / v
            v = self.forward(xc.to(device, dtype), timestep, cond).float().to(x.device)
            return sampling.calculate_denoised(sigma, v, x)

        return denoise


def _to_rows(v, b: int, device, dtype):
    """A conditioning value on the model's device: a tensor with b rows (floats in the compute dtype), a list of
    tensors (Qwen-Image-Edit's reference latents: their own batch, fp32), anything else (a method name) as is."""
    if isinstance(v, torch.Tensor):
        return batch_rows(v, b).to(device, dtype if v.is_floating_point() else v.dtype)
    if isinstance(v, list):
        return [t.to(device) for t in v]
    return v


def batch_rows(t: torch.Tensor, b: int) -> torch.Tensor:
    """Conditioning rows for a latent batch of b: one row (or n dividing b) repeat."""
    if t.shape[0] == b:
        return t
    if b % t.shape[0]:
        raise ValueError(f"conditioning batch {t.shape[0]} does not divide latent batch {b}")
    return t.repeat(b // t.shape[0], *([1] * (t.dim() - 1)))


def all_gather_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    chunks = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(chunks, x, group=group)
    return torch.cat(chunks, dim=1)
