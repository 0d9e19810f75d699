"""The model-family seam: what a DiT family gives the core, and the registry that finds a file's family.

A family is a diffusers transformer class plus this spec. The core (config, mesh, attention, pipefusion, the
sampling loop, pool, worker shell, client, nodes) asks the spec and never names a family. The forward is
prologue (embedders, positions; full sequence) -> blocks -> head (per token) -> unpatchify, so sequence
parallelism shards after the prologue and gathers before unpatchify, and PipeFusion stages split the same
block list (models/dit.py, pipefusion/stage.py).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field

import torch

from .blocks import BlockLayout, random_transformer
from .checkpoint import CheckpointError, diffusion_model_keys, key_sample, guess_content, read_header, with_path


@dataclass
class Step:
    """One forward's inputs as the blocks take them, computed by Family.prologue on the full sequence.

    image/text: embedded tokens [B, S, D] / [B, T, D] (None on a PipeFusion stage without the embedders);
    rope: tensors indexed by joint token ([text | image]) along dim 0, sliced with the tokens a rank holds;
    control: what a ControlNet needs of this forward (the family's, opaque to the core)."""

    temb: torch.Tensor
    text_len: int
    image_len: int
    image: torch.Tensor | None = None
    text: torch.Tensor | None = None
    rope: tuple | None = None
    control: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # the family's own per-forward facts (its head's embedding, ...)


class Family:
    """Base spec; one subclass instance per family, registered in FAMILIES."""

    name = ""                      # "flux", "sd3"
    label = ""                     # for messages: "Flux.1", "SD3 / SD3.5"
    transformer_class = None       # the diffusers class
    blocks: BlockLayout
    latent_format = None           # sampling.LatentFormat
    patch_size = 2                 # latent pixels per token side
    conditioning = ("context", "pooled")  # named tensors a denoiser needs ([B, T, D], [B, P])
    # ComfyUI's diffusion-model keyword for each conditioning name, as its BaseModel.apply_model passes them (the
    # stepwise path: a ComfyUI MODEL whose forward runs on the pool); a keyword not listed is refused there
    comfy_inputs = {"context": "context", "y": "pooled", "guidance": "guidance"}
    presets: dict = {}             # random-weight configs by name (tests, demo, benchmarks)
    guided = False                 # usually sampled with cfg > 1 (a negative prompt): "auto" picks CFG parallel
    # self + cross attention (Wan, PixArt, HunyuanDiT): the text is replicated on every rank and never joins the
    # sharded sequence; RoPE rows then index the image tokens alone. Such a family brings its own processor
    # (own_processors), which reaches the text through ShardState.cross.
    cross_attention = False
    own_processors = False         # the family's attention processor runs even on one rank (not only under USP)
    video = False                  # 5-D latents [B, C, t, h, w]
    # conditioning names that add image tokens beyond the latent's grid (Qwen-Image-Edit's reference latents):
    # sequence parallelism shards them with the image tokens; PipeFusion's row patches cannot hold them
    extra_tokens: tuple = ()
    # a ModelSampling (xDiT) shift: None changes the shift of the family's own model sampling (ModelSamplingSD3 /
    # ModelSamplingFlux); a number switches to discrete flow at that multiplier (Qwen-Image: ComfyUI's
    # ModelSamplingAuraFlow, 1.0), on both the Sampler (xDiT) and the MODEL path
    shift_multiplier: float | None = None
    # PipeFusion can split this family's blocks over stages (False: HunyuanDiT, whose long skips would have to
    # cross stages): auto never picks it, and a PipeFusion layout is refused before any weight is read
    pipefusion = True

    # --- checkpoints ---------------------------------------------------------------------------
    def detect(self, keys) -> str | None:
        """The layout name if these (prefix-stripped) keys are this family's transformer, else None."""
        raise NotImplementedError

    def read_info(self, path):
        """An info with .config, .layout, .variant and .stored_dtypes from the header alone."""
        raise NotImplementedError

    def load(self, path, dtype=torch.bfloat16, device="cpu", fp8: bool = False, stage=None, progress=None):
        """(transformer in eval mode, info); fp8, stage and progress as the Flux loader documents them."""
        raise NotImplementedError

    def random(self, config: dict, seed: int = 0, dtype=torch.float32, device="cpu", fp8: bool = False,
               stage=None):
        return random_transformer(self.transformer_class, config, self.blocks, seed=seed, dtype=dtype,
                                  device=device, fp8=fp8, stage=stage, width=self.width(config))

    def preset_config(self, preset: str) -> dict:
        if preset not in self.presets:
            raise ValueError(f"unknown {self.label} preset {preset!r}; choose from {sorted(self.presets)}")
        return dict(self.presets[preset])

    # --- LoRA and ControlNets (families without them refuse with a clear error) ---------------------
    def load_lora(self, path, shapes: dict):
        """A parsed LoRA (models/lora.ParsedLora) checked against the whole model's parameter shapes."""
        raise CheckpointError(f"{path}: LoRAs for {self.label} models are not supported yet")

    def load_controlnet(self, path, dtype, device):
        raise CheckpointError(f"{path}: ControlNets for {self.label} models are not supported yet")

    def with_controls(self, model, controls: list):
        """The model adapter with ControlNets applied; controls: dicts of controlnet, info, hint (model-space
        latent or pixels), strength, start_percent, end_percent, mode."""
        raise ValueError(f"ControlNets for {self.label} models are not supported yet")

    def processor(self, state, image_only: bool = False):
        """The attention processor installed on attention_modules' modules (joint attention by default)."""
        from .joint_attention import JointAttnProcessor

        return JointAttnProcessor(state, image_only=image_only)

    def latent_format_for(self, config: dict):
        """The latent format of this model (families whose releases differ, e.g. Wan 2.1 vs 2.2, override)."""
        return self.latent_format

    def prepare_conditioning(self, config: dict, cond: dict, latent_shape: tuple) -> dict:
        """The conditioning as the forward takes it, once per sampling run (e.g. an I2V model's concat input)."""
        return cond

    def meta_model(self, config: dict):
        with torch.device("meta"):
            return self.transformer_class(**config)

    # --- shapes and sampling ----------------------------------------------------------------------
    def num_heads(self, config: dict) -> int:
        return config["num_attention_heads"]

    def width(self, config: dict) -> int:
        return config["num_attention_heads"] * config["attention_head_dim"]

    def variant(self, config: dict) -> str:
        return self.name

    def model_sampling(self, config: dict, latent_shape: tuple, shift: float | None = None):
        """ComfyUI's model sampling for this model (shift: a ModelSampling* node's override)."""
        raise NotImplementedError

    def token_grid(self, latent_shape: tuple) -> tuple[int, int]:
        """(token rows, tokens per row) of a latent; image tokens are row-major."""
        h, w = latent_shape[-2:]
        return h // self.patch_size, w // self.patch_size

    def check_latent(self, config: dict, latent_shape: tuple) -> None:
        c, (h, w) = latent_shape[1], latent_shape[-2:]
        if c != self.latent_format.channels:
            raise ValueError(f"{self.label} latents have {self.latent_format.channels} channels, got {c} "
                             f"(use EmptySD3LatentImage, not EmptyLatentImage)")
        if h % self.patch_size or w % self.patch_size:
            px = 8 * self.patch_size
            raise ValueError(f"a {w * 8}x{h * 8} px image (width x height; latent {w}x{h}) does not split into "
                             f"{self.patch_size}x{self.patch_size} patches: {self.label} needs image sizes that are "
                             f"multiples of {px} px")

    # --- the forward, decomposed ---------------------------------------------------------------------
    def prologue(self, transformer, x: torch.Tensor, sigma: torch.Tensor, cond: dict, embed: bool = True) -> Step:
        """Model-space latent x [B, C, h, w], sigma [B] fp32 and the conditioning -> Step (embed False: only
        what every PipeFusion stage needs: temb and positions)."""
        raise NotImplementedError

    def run_block(self, block, image: torch.Tensor, text: torch.Tensor, step: Step, rope) -> tuple:
        """One block on (this rank's) tokens -> (image, text); text may come back None (SD3's last block)."""
        kwargs = {} if rope is None else {"image_rotary_emb": rope}
        text, image = block(hidden_states=image, encoder_hidden_states=text, temb=step.temb, **kwargs)
        return image, text

    def head(self, transformer, image: torch.Tensor, step: Step) -> torch.Tensor:
        """Per image token: the final norm and projection -> [B, S, out]."""
        return transformer.proj_out(transformer.norm_out(image, step.temb))

    def unpatchify(self, tokens: torch.Tensor, latent_shape: tuple) -> torch.Tensor:
        """[B, S, out] row-major tokens -> the prediction [B, C, h, w]."""
        raise NotImplementedError

    def attention_modules(self, block) -> list[tuple[torch.nn.Module, bool]]:
        """(attention module, image_only) pairs inside a block, for the sequence-parallel processor."""
        raise NotImplementedError


FAMILIES: list[Family] = []


def all_presets() -> dict:
    """Random-weight preset name -> family, over every family (names are unique across families)."""
    return {name: f for f in _families() for name in f.presets}


def family_for_preset(preset: str) -> Family:
    presets = all_presets()
    if preset not in presets:
        raise ValueError(f"unknown random preset {preset!r}; choose from {sorted(presets)}")
    return presets[preset]


def register(family: Family) -> Family:
    FAMILIES.append(family)
    return family


@functools.cache
def _families() -> tuple[Family, ...]:
    """Every family package under models/ (each registers its spec on import), found without naming them; the
    folder is scanned once, not on every load request."""
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            importlib.import_module(f"{__package__}.{info.name}")
    return tuple(sorted(FAMILIES, key=lambda f: f.name))


def known_families() -> str:
    return ", ".join(f.label for f in _families())


def detect_family(path) -> tuple[Family, str]:
    """(family, layout) of a checkpoint from its header's keys and shapes (never its name); a clear error
    listing the known families otherwise."""
    header = read_header(path)
    keys, prefix = diffusion_model_keys(header)
    stripped = [k[len(prefix):] for k in keys]
    if not stripped:
        raise CheckpointError(f"{path}: contains no tensors; expected a diffusion model checkpoint "
                              f"({known_families()})")
    for family in _families():
        layout = family.detect(stripped)
        if layout is not None:
            return family, layout
    hint = guess_content(stripped)
    raise CheckpointError(f"{path}: not a diffusion transformer this pack knows (found keys like "
                          f"{key_sample(stripped)}); {hint}{'' if hint.endswith('?') else '.'} Known families: "
                          f"{known_families()}")


def read_info(path):
    """(family, info) from the header alone."""
    family, _ = detect_family(path)
    try:
        return family, family.read_info(path)
    except CheckpointError as e:
        raise with_path(path, e) from e
