"""Load single-file KL VAEs (Flux.1 ``ae.safetensors``, SD/SDXL VAEs) into diffusers' AutoencoderKL.

Accepted layouts: the original LDM/BFL keys used by ComfyUI (``encoder.down.0.block.0.*``,
``encoder.mid.attn_1.q.*``), optionally under ``first_stage_model.`` or ``vae.`` (other
components in an all-in-one file are ignored), and diffusers keys (``encoder.down_blocks.*``,
including the pre-0.14 ``query``/``key``/``value``/``proj_attn`` attention names). The config
is derived from tensor shapes only; nothing is fetched.

``decode``/``encode`` follow ComfyUI's VAE: a LATENT holds raw VAE-space values (the latent
format's scale/shift is the sampler's job, see ``VaeInfo.process_in``), IMAGE is float32
[B, H, W, C] in 0..1, and encoding returns the posterior mode (its mean).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from comfy_xdit.models.checkpoint import (CheckpointError, assign_state_dict, key_sample, meta_shapes, num_blocks, read_header,
                                         read_tensors, stored_dtypes, with_path)

PREFIXES = ("first_stage_model.", "vae.")
VAE_EXPECTED = "a VAE checkpoint"
# latent_channels -> (name, scale, shift) as in ComfyUI's latent_formats; 16 could also be SD3 (1.5305, 0.0609)
LATENT_FORMATS = {16: ("flux", 0.3611, 0.1159), 4: ("sd15", 0.18215, 0.0)}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # last four: old diffusers names
_ATTN_W = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


@dataclass
class VaeInfo:
    """What was loaded, plus the latent format to pair it with.

    16-channel VAEs are assumed to be Flux.1's (scale 0.3611, shift 0.1159): SD3's VAE has the
    same shapes but uses scale 1.5305, shift 0.0609, and nothing in the file tells them apart.
    Likewise 4 channels are assumed SD1.x (0.18215); SDXL's VAE (0.13025) is indistinguishable.
    Other channel counts get latent_format None with identity scale/shift.

    The Wan video VAEs (vae/wan.py) have latent_format "wan21" (16 channels) or "wan22" (48) with per-channel
    latents_mean / latents_std (ComfyUI's latent_formats.Wan21 / Wan22), latent_dims 3 ([B, C, T, h, w]),
    temporal_ratio 4 and spatial_ratio 8 (2.1) or 16 (2.2)."""
    path: str
    layout: str
    config: dict
    latent_channels: int
    latent_format: str | None
    scale_factor: float
    shift_factor: float
    stored_dtypes: set = field(default_factory=set)
    latents_mean: tuple | None = None  # per channel; when set, replaces shift_factor
    latents_std: tuple | None = None
    latent_dims: int = 2  # dimensions after [B, C]: 2 for images, 3 for video (T, h, w)
    temporal_ratio: int = 1  # video frames per latent frame (the first latent frame holds one)
    spatial_ratio: int = 8  # pixels per latent row / column

    @property
    def is_video(self) -> bool:
        return self.latent_dims == 3

    def _stats(self, latent):
        view = (1, -1) + (1,) * (latent.ndim - 2)
        return (torch.tensor(self.latents_mean, dtype=latent.dtype, device=latent.device).view(view),
                torch.tensor(self.latents_std, dtype=latent.dtype, device=latent.device).view(view))

    def process_in(self, latent):
        """Raw VAE latent -> the diffusion model's space (ComfyUI's LatentFormat.process_in)."""
        if self.latents_mean is not None:
            mean, std = self._stats(latent)
            return (latent - mean) * self.scale_factor / std
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent):
        """Diffusion model's space -> raw VAE latent, ready for ``decode``."""
        if self.latents_mean is not None:
            mean, std = self._stats(latent)
            return latent * std / self.scale_factor + mean
        return latent / self.scale_factor + self.shift_factor


_TO_LDM = [  # (diffusers regex, LDM replacement); n is the number of decoder up blocks, which LDM numbers in reverse
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.",
     lambda m, n: f"{m[1]}.mid.attn_1.{_ATTN[m[2]]}."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m, n: f"encoder.down.{m[1]}.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample."),
    (r"\.conv_shortcut\.", lambda m, n: ".nin_shortcut."),
    (r"^(encoder|decoder)\.conv_norm_out\.", lambda m, n: f"{m[1]}.norm_out."),
]


def _ldm_key(k: str, n_up: int) -> str:
    for pat, rep in _TO_LDM:
        k = re.sub(pat, lambda m: rep(m, n_up), k)
    return k


def vae_to_ldm(sd) -> dict:
    """diffusers AutoencoderKL keys -> LDM/ComfyUI keys (no prefix); attention linears become 1x1 convs."""
    n_up = num_blocks(list(sd), "decoder.up_blocks.")
    out = {_ldm_key(k, n_up): v for k, v in sd.items()}
    return {k: v.reshape(*v.shape, 1, 1) if _ATTN_W.match(k) and v.ndim == 2 else v for k, v in out.items()}


def _strip_prefix(keys) -> tuple[list, str]:
    for p in PREFIXES:
        if any(k.startswith(p) for k in keys):  # all-in-one file: keep only the VAE
            return [k for k in keys if k.startswith(p)], p
    return list(keys), ""


def _not_a_vae(keys) -> CheckpointError:
    hints = [(("double_blocks.", "single_blocks.", "transformer_blocks.", "model.diffusion_model.double_blocks."),
              "a Flux.1 transformer"), (("input_blocks.", "model.diffusion_model."), "an SD/SDXL UNet"),
             (("joint_blocks.",), "an SD3 MMDiT"), (("taesd_",), "a TAESD model"),
             (("text_model.", "encoder.block.", "shared.", "cond_stage_model.", "text_encoders."), "a text encoder")]
    hint = next((f"; this looks like {name}" for pre, name in hints if any(k.startswith(pre) for k in keys)), "")
    return CheckpointError("does not look like a KL VAE: no 'encoder.conv_in.weight' and 'decoder.conv_in.weight' "
                           f"(found keys like {key_sample(keys)}){hint}")


def detect_vae_layout(keys) -> str:
    """'ldm' (original/ComfyUI keys) or 'diffusers', for prefix-stripped keys; else CheckpointError."""
    keys = list(keys)
    if not keys:
        raise CheckpointError("contains no tensors; expected a VAE checkpoint")
    if not {"encoder.conv_in.weight", "decoder.conv_in.weight"} <= set(keys):
        raise _not_a_vae(keys)
    return "diffusers" if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys) else "ldm"


def vae_config_from_state_dict(sd) -> dict:
    """AutoencoderKL kwargs from LDM-keyed tensor shapes only (works on meta tensors); norm_num_groups is 32."""
    n = num_blocks(list(sd), "encoder.down.")
    need = ["encoder.conv_out.weight", "decoder.conv_out.weight"] + [f"encoder.down.{i}.block.0.conv1.weight"
                                                                     for i in range(max(n, 1))]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"missing keys needed to infer the VAE size: {missing[:5]}")
    latent = int(sd["decoder.conv_in.weight"].shape[1])
    if sd["encoder.conv_out.weight"].shape[0] != 2 * latent:  # mean and logvar of a diagonal Gaussian
        raise CheckpointError(f"encoder outputs {sd['encoder.conv_out.weight'].shape[0]} channels, expected "
                              f"2 x {latent} latent channels; not a KL VAE")
    name, scale, shift = LATENT_FORMATS.get(latent, (None, 1.0, 0.0))
    return dict(in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
                out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(n)),
                layers_per_block=num_blocks(list(sd), "encoder.down.0.block."), latent_channels=latent,
                norm_num_groups=32, scaling_factor=scale, shift_factor=shift if name == "flux" else None,
                use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd,
                mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd)


def _fits(s, e) -> bool:
    s, e = tuple(s), tuple(e)
    return s == e or (len(e) == 2 and s[:2] == e and all(d == 1 for d in s[2:]))  # 1x1-conv attention weights


def load_vae(path, dtype=torch.float32, device="cpu"):
    """Load a single-file VAE; returns (AutoencoderKL in eval mode, VaeInfo), or (AutoencoderKLWan, VaeInfo) for a
    Wan 2.1 / 2.2 video VAE (recognised from its keys, see vae/wan.py)."""
    from diffusers import AutoencoderKL

    from comfy_xdit.vae import wan

    path = os.fspath(path)
    try:
        header = read_header(path, VAE_EXPECTED)
        if wan.is_wan_vae(header):
            return wan.load_wan_vae(path, dtype=dtype, device=device)
        keys, prefix = _strip_prefix(list(header))
        shapes = {k[len(prefix):]: v for k, v in meta_shapes(header, keys).items()}
        layout = detect_vae_layout(shapes)
        ldm_shapes = vae_to_ldm(shapes) if layout == "diffusers" else shapes
        config = vae_config_from_state_dict(ldm_shapes)
        with torch.device("meta"):  # no weight allocation; real tensors are assigned below
            model = AutoencoderKL(**config)
        expected = model.state_dict()
        n_up = len(config["up_block_types"])
        to_diff = {_ldm_key(k, n_up): k for k in expected}  # exact inverse of vae_to_ldm on the model's own keys
        name = (lambda k: to_diff.get(k, k)) if layout == "diffusers" else (lambda k: k)  # report in the file's naming
        missing = [name(k) for k in to_diff if k not in ldm_shapes]
        if missing:
            raise CheckpointError(f"{len(missing)} keys missing for a VAE with {config['block_out_channels']} channels "
                                  f"and {config['layers_per_block']} resnets per block, e.g. {missing[:5]}")
        left = sorted(set(ldm_shapes) - set(to_diff))
        if left:
            raise CheckpointError(f"{len(left)} unexpected keys for a diffusers AutoencoderKL, e.g. {left[:5]}")
        bad = [f"{name(k)}: {tuple(ldm_shapes[k].shape)} != {tuple(expected[d].shape)}"
               for k, d in to_diff.items() if not _fits(ldm_shapes[k].shape, expected[d].shape)]
        if bad:
            raise CheckpointError(f"tensor shapes do not fit the inferred VAE config, e.g. {bad[:3]}")
        sd = {k[len(prefix):]: v for k, v in read_tensors(path, keys, dtype=dtype, device=device, expected=VAE_EXPECTED).items()}
        sd = vae_to_ldm(sd) if layout == "diffusers" else sd
        sd = {d: sd[k].reshape(expected[d].shape) for k, d in to_diff.items()}
    except CheckpointError as e:
        raise with_path(path, e) from e
    model = assign_state_dict(model, sd, path)
    fmt, scale, shift = LATENT_FORMATS.get(config["latent_channels"], (None, 1.0, 0.0))
    info = VaeInfo(path=path, layout=layout, config=config, latent_channels=config["latent_channels"],
                   latent_format=fmt, scale_factor=scale, shift_factor=shift,
                   stored_dtypes=stored_dtypes(header, keys),
                   spatial_ratio=2 ** (len(config["block_out_channels"]) - 1))
    return model, info


def write_vae_checkpoint(model, path, layout="ldm", dtype=None):
    """Save an AutoencoderKL as one file: 'ldm' (BFL ae.safetensors keys), 'comfy' (LDM keys under
    first_stage_model.) or 'diffusers'."""
    from safetensors.torch import save_file

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if layout in ("ldm", "comfy"):
        sd = vae_to_ldm(sd)
    elif layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}")
    prefix = PREFIXES[0] if layout == "comfy" else ""
    # clone: save_file rejects tensors that share storage
    save_file({prefix + k: v.to(dtype or v.dtype).contiguous().clone() for k, v in sd.items()}, os.fspath(path))
    return path


def _spatial_ratio(vae) -> int:
    if _is_wan(vae):
        from comfy_xdit.vae import wan

        return wan.spatial_ratio(vae)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _is_wan(vae) -> bool:
    return type(vae).__name__ == "AutoencoderKLWan"


@torch.no_grad()
def decode(vae, latent):
    """VAE latent [B, C, h, w] -> IMAGE float32 [B, 8h, 8w, 3] in 0..1 on the latent's device (ComfyUI VAE.decode)."""
    if _is_wan(vae):  # video: [B, C, T, h, w] -> [B * F, H, W, 3], see vae/wan.py
        from comfy_xdit.vae import wan

        return wan.decode(vae, latent)
    c = vae.config.latent_channels
    if latent.ndim != 4 or latent.shape[1] != c:
        raise ValueError(f"latent of shape {tuple(latent.shape)} does not fit a VAE with {c} latent channels; "
                         f"expected [B, {c}, h, w]")
    p = next(vae.parameters())
    x = vae.decode(latent.to(p.device, p.dtype)).sample.to(latent.device).float()
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)


@torch.no_grad()
def encode(vae, image):
    """IMAGE [B, H, W, C] in 0..1 -> raw latent float32 [B, C, H/8, W/8] (posterior mean), on the image's device.

    As in ComfyUI, channels past the third (alpha) are dropped and H, W are center-cropped to
    multiples of 8 (the VAE's downscale). A Wan VAE takes the IMAGE as the frames of one video (vae/wan.py)."""
    if _is_wan(vae):
        from comfy_xdit.vae import wan

        return wan.encode(vae, image)
    r = _spatial_ratio(vae)
    if image.ndim != 4 or image.shape[-1] < 3 or image.shape[1] < r or image.shape[2] < r:
        raise ValueError(f"image of shape {tuple(image.shape)} is not an IMAGE [B, H, W, C>=3] with H, W >= {r}")
    for d in (1, 2):
        size = image.shape[d] // r * r
        image = image.narrow(d, (image.shape[d] % r) // 2, size)
    p = next(vae.parameters())
    x = (image[..., :3].movedim(-1, 1) * 2.0 - 1.0).to(p.device, p.dtype)
    return vae.encode(x).latent_dist.mode().to(image.device).float()
