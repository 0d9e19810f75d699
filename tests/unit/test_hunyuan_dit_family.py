"""The HunyuanDiT family on ComfyUI's terms: the decomposed forward (our processor, the skip stack, ComfyUI's RoPE,
the v half of the head) against diffusers' own HunyuanDiT2DModel forward, ComfyUI's text-mask rule (masked tokens
become the learned padding, so their values never matter; the pooled mT5 sees raw states), the RoPE rule against
diffusers' own helpers, the long-skip pairing, image-size / style defaults, model sampling, checks and PipeFusion's
refusal. (The forward against ComfyUI's own HunYuanDiT runs where ComfyUI's Python is; see the family module.)"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.models.dit import DiTModel
from comfy_xdit.models.hunyuan_dit import HUNYUAN_DIT, SDXL_LATENT
from comfy_xdit.models.hunyuan_dit.family import comfy_rope, fill_resize_and_crop, hunyuan_dit_sampling
from comfy_xdit.models.joint_attention import ShardState
from tests.flux_tiny import rel_err
from tests.hunyuan_dit_tiny import TINY_PRESETS, hunyuan_dit_cond, make_tiny_hunyuan_dit

HW = (12, 16)


def _forward(dit, x, sigma, cond):
    config = dit.config
    with torch.no_grad():
        return dit.forward(x, sigma, HUNYUAN_DIT.prepare_conditioning(config, dict(cond), tuple(x.shape)))


def _diffusers_forward(model, x, sigma, cond, meta):
    """diffusers' own forward with its own processor, given ComfyUI's RoPE and timestep; the v channels kept."""
    from diffusers.models.attention_processor import HunyuanAttnProcessor2_0

    model.set_attn_processor(HunyuanAttnProcessor2_0())
    config = model.config
    timestep = hunyuan_dit_sampling(config.use_style_cond_and_image_meta_size).timestep(sigma).float()
    rope = comfy_rope(config.attention_head_dim, x.shape[2] // 2, x.shape[3] // 2, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        out = model(x, timestep, encoder_hidden_states=cond["context"],
                    text_embedding_mask=cond["text_embedding_mask"],
                    encoder_hidden_states_t5=cond["encoder_hidden_states_t5"],
                    text_embedding_mask_t5=cond["text_embedding_mask_t5"], image_meta_size=meta,
                    style=torch.zeros(x.shape[0], dtype=torch.long), image_rotary_emb=rope, return_dict=False)[0]
    return out[:, :x.shape[1]]


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("hw", [HW, (8, 8)])
def test_forward_equals_diffusers(preset, hw):
    """At the model's own text lengths (diffusers' forward takes no other) with padded masks, the whole forward
    equals diffusers' own, skips and all; the image-size default is the latent's size in pixels."""
    model = make_tiny_hunyuan_dit(preset, seed=6)
    config = dict(model.config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *hw, generator=g)
    cond = hunyuan_dit_cond(config, 2, g, real=(5, 9))
    cond["text_embedding_mask"][1] = 1  # the second row unpadded
    sigma = torch.tensor([9.0, 0.4])
    got = _forward(DiTModel(HUNYUAN_DIT, model), x, sigma, cond)
    h, w = hw
    meta = torch.tensor([[h * 8.0, w * 8.0, h * 8.0, w * 8.0, 0.0, 0.0]] * 2)
    want = _diffusers_forward(model, x, sigma, cond, meta)
    assert got.shape == x.shape and want.std() > 0.05
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), float((got - want).abs().max())


def test_a_wrong_skip_or_order_is_caught():
    """A skip reaching the wrong block moves the output off diffusers' (so the pairing test above has teeth);
    the family pairs block i > N/2 with block N-1-i and refuses blocks out of order."""
    model = make_tiny_hunyuan_dit(seed=7)
    dit = DiTModel(HUNYUAN_DIT, model)
    g = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(1, 4, *HW, generator=g), torch.tensor([3.0])
    cond = hunyuan_dit_cond(dict(model.config), 1, g)
    right = _forward(dit, x, sigma, cond)
    real, pairs = HUNYUAN_DIT.run_block, []

    def swapped(block, image, text, step, rope):
        skips = step.extra["skips"]
        if step.extra["next"] == 4:  # block 4 would take block 1's output; give it block 0's
            skips[:] = skips[::-1]
        if step.extra["next"] > 3:
            pairs.append((step.extra["next"], [id(s) for s in skips]))
        return real(block, image, text, step, rope)

    HUNYUAN_DIT.run_block = swapped
    try:
        wrong = _forward(dit, x, sigma, cond)
    finally:
        HUNYUAN_DIT.run_block = real
    assert rel_err(wrong, right) > 1e-3
    # the rule itself: 6 blocks push blocks 0, 1 and pop them at blocks 4, 5
    outs = {}

    def recording(block, image, text, step, rope):
        i = step.extra["next"]
        skip = step.extra["skips"][-1] if i > 3 else None
        image, text = real(block, image, text, step, rope)
        outs[i] = (image, skip)
        return image, text

    HUNYUAN_DIT.run_block = recording
    try:
        _forward(dit, x, sigma, cond)
    finally:
        HUNYUAN_DIT.run_block = real
    assert outs[4][1] is outs[1][0] and outs[5][1] is outs[0][0]
    assert [i for i, b in enumerate(model.blocks) if b.skip_linear is not None] == [4, 5]
    step = HUNYUAN_DIT.prologue(model, x, sigma, HUNYUAN_DIT.prepare_conditioning(dict(model.config), dict(cond),
                                                                                 x.shape))
    with pytest.raises(RuntimeError, match="block 2 ran after block -1"):
        HUNYUAN_DIT.run_block(model.blocks[2], step.image, step.text, step, step.rope)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_masked_tokens_do_not_matter(preset):
    """ComfyUI's rule: a masked token among a text's last text_len (BERT) / text_len_t5 (mT5) becomes the learned
    padding, so its value never reaches the output; a BERT text longer than text_len keeps its leading tokens
    whatever the mask says; the pooler takes the first text_len_t5 raw mT5 states, masked or not."""
    model = make_tiny_hunyuan_dit(preset, seed=8)
    config = dict(model.config)
    dit = DiTModel(HUNYUAN_DIT, model)
    g = torch.Generator().manual_seed(3)
    L, L5 = config["text_len"], config["text_len_t5"]
    x, sigma = torch.randn(1, 4, *HW, generator=g), torch.tensor([2.0])
    cond = hunyuan_dit_cond(config, 1, g, bert_len=L + 3, t5_len=L5 + 3, real=(L, L5 - 2))
    cond["text_embedding_mask"][0, 1] = 0     # outside the last L: kept as is
    base = _forward(dit, x, sigma, cond)

    def changed(name, index):
        other = {k: v.clone() for k, v in cond.items()}
        other[name][0, index] = torch.randn(other[name].shape[-1], generator=g) * 3
        return rel_err(_forward(dit, x, sigma, other), base)

    assert changed("context", L + 1) == 0.0          # masked, in the last L
    assert changed("encoder_hidden_states_t5", L5 + 2) == 0.0  # masked, in the last L5, not pooled
    assert changed("context", 1) > 1e-4              # masked but before the last L: ComfyUI keeps it
    assert changed("encoder_hidden_states_t5", L5 - 1) > 1e-4  # masked, yet the pooler sees its raw state
    assert changed("context", 0) > 1e-4 and changed("encoder_hidden_states_t5", 0) > 1e-4
    unmasked = dict(cond, text_embedding_mask=torch.ones_like(cond["text_embedding_mask"]))
    assert rel_err(_forward(dit, x, sigma, unmasked), base) > 1e-4  # the padding rows are not the states
    short = dict(cond, context=cond["context"][:, :L - 1], text_embedding_mask=cond["text_embedding_mask"][:, :L - 1])
    with pytest.raises(ValueError, match=f"context has {L - 1} tokens; this HunyuanDiT takes at least {L}"):
        _forward(dit, x, sigma, short)


def _numpy_rope(head_dim, rows, cols):
    """ComfyUI's rule written out with numpy: positions np.linspace(start, stop, n, endpoint=False) per axis of the
    fitted region, the column coordinate on the first half of each head, frequencies 10000^(-2i / (head_dim / 2))."""
    import numpy as np

    (top, left), (bottom, right) = fill_resize_and_crop(rows, cols, 32)
    ph = np.linspace(top, bottom, rows, endpoint=False, dtype=np.float32)
    pw = np.linspace(left, right, cols, endpoint=False, dtype=np.float32)
    gw, gh = (torch.from_numpy(g.reshape(-1)) for g in np.meshgrid(pw, ph))
    d = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d)
    angles = torch.cat([torch.outer(gw, freqs), torch.outer(gh, freqs)], dim=1).repeat_interleave(2, dim=1)
    return angles.cos(), angles.sin()


def test_rope_follows_comfyuis_rule():
    """ComfyUI's fit into the 32-token base grid (the longer side fills it, the other rounded and centred), the
    RoPE against that rule written out, and against diffusers' own 2-D RoPE helper on square grids (where the fit
    starts at 0: on other grids diffusers' emulation of endpoint=False, stop * (n - 1) / n, ignores the start and
    so differs from ComfyUI's and the original HunyuanDiT's positions)."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    assert fill_resize_and_crop(64, 64, 32) == ((0, 0), (32, 32))   # 1024 px square
    assert fill_resize_and_crop(48, 64, 32) == ((4, 0), (28, 32))   # 768 x 1024 (h x w)
    assert fill_resize_and_crop(64, 36, 32) == ((0, 7), (32, 25))   # width 18, its margin 7
    assert fill_resize_and_crop(7, 5, 32) == ((0, 4), (32, 27))     # margin 4.5 rounds half to even
    for rows, cols in ((6, 8), (64, 64), (48, 64), (64, 36), (10, 30), (7, 5), (20, 20)):
        cos, sin = comfy_rope(88, rows, cols, torch.float32, torch.device("cpu"))
        want = _numpy_rope(88, rows, cols)
        assert cos.shape == (rows * cols, 88)
        assert torch.allclose(cos, want[0], atol=1e-6) and torch.allclose(sin, want[1], atol=1e-6)
        if rows == cols:
            theirs = get_2d_rotary_pos_embed(88, fill_resize_and_crop(rows, cols, 32), (rows, cols), use_real=True)
            assert torch.allclose(cos, theirs[0].float(), atol=1e-5) and torch.allclose(sin, theirs[1].float(),
                                                                                        atol=1e-5)


def test_image_size_and_style_conditions():
    """v1.0 / v1.1: ComfyUI's default image size is the latent's in pixels, twice, without crop; another size
    moves the output; a size micro-condition (c_size) becomes the same image_meta_size; v1.2 drops them all."""
    model = make_tiny_hunyuan_dit("tiny-hunyuan-dit-v1.1", seed=9)
    config = dict(model.config)
    dit = DiTModel(HUNYUAN_DIT, model)
    g = torch.Generator().manual_seed(4)
    x, sigma = torch.randn(1, 4, *HW, generator=g), torch.tensor([1.5])
    cond = hunyuan_dit_cond(config, 1, g)
    h, w = HW[0] * 8, HW[1] * 8
    default = _forward(dit, x, sigma, cond)
    assert rel_err(_forward(dit, x, sigma, dict(cond, image_meta_size=torch.tensor([[h, w, h, w, 0, 0.0]]))),
                   default) == 0.0
    assert rel_err(_forward(dit, x, sigma, dict(cond, style=torch.tensor([0]))), default) == 0.0
    other = dict(cond, image_meta_size=torch.tensor([[768.0, 1024.0, 768.0, 1024.0, 0.0, 0.0]]))
    moved = _forward(dit, x, sigma, other)
    assert rel_err(moved, default) > 1e-4
    c_size = dict(cond, c_size=torch.tensor([[768.0, 1024.0]]), c_ar=torch.tensor([[0.75]]))
    assert rel_err(_forward(dit, x, sigma, c_size), moved) == 0.0
    with pytest.raises(ValueError, match=r"image_meta_size must be \[N, 6\]"):
        HUNYUAN_DIT.prepare_conditioning(config, dict(cond, image_meta_size=torch.zeros(1, 4)), (1, 4, *HW))
    v12 = dict(HUNYUAN_DIT.preset_config("tiny-hunyuan-dit"))
    assert set(HUNYUAN_DIT.prepare_conditioning(v12, dict(other, style=torch.tensor([0])), (1, 4, *HW))) == set(cond)


def test_sampling_latents_and_checks():
    v12, v11 = (HUNYUAN_DIT.preset_config(p) for p in ("hunyuan-dit-v1.2", "hunyuan-dit-v1.1"))
    s12, s11 = HUNYUAN_DIT.model_sampling(v12, (1, 4, 128, 128)), HUNYUAN_DIT.model_sampling(v11, (1, 4, 128, 128))
    assert s12.prediction == s11.prediction == "v" and (s12.linear_end, s11.linear_end) == (0.018, 0.03)
    assert s12.schedule == "linear" and s12.linear_start == 0.00085
    assert HUNYUAN_DIT.latent_format_for(v12) is SDXL_LATENT and SDXL_LATENT.scale == 0.13025
    with pytest.raises(ValueError, match="no shift"):
        HUNYUAN_DIT.model_sampling(v12, (1, 4, 128, 128), shift=3.0)
    with pytest.raises(ValueError, match="4 channels, got 16"):
        HUNYUAN_DIT.check_latent(v12, (1, 16, 128, 128))
    with pytest.raises(ValueError, match="multiples of 16 px"):
        HUNYUAN_DIT.check_latent(v12, (1, 4, 127, 128))
    with pytest.raises(ValueError, match="latents"):
        HUNYUAN_DIT.check_latent(v12, (1, 4, 3, 128, 128))
    dit = DiTModel(HUNYUAN_DIT, make_tiny_hunyuan_dit(seed=1))
    with pytest.raises(ValueError, match="needs conditioning text_embedding_mask, encoder_hidden_states_t5"):
        dit.check_conditioning({"context": torch.zeros(1, 8, 32)})


def test_pipefusion_is_refused():
    """Refused before any weight is read (the worker's load and PipeFusionModel), and never picked by auto."""
    from comfy_xdit.memory import auto_layout
    from comfy_xdit.pipefusion.stage import check_pipefusion

    assert HUNYUAN_DIT.pipefusion is False
    with pytest.raises(ValueError, match="PipeFusion cannot run HunyuanDiT"):
        check_pipefusion(HUNYUAN_DIT)
    config = HUNYUAN_DIT.preset_config("hunyuan-dit-v1.2")
    layout, storage = auto_layout(HUNYUAN_DIT, config, 2, "bf16", int(2.5e9), "cuda:0")  # bf16 needs ~3.3 GB
    assert layout.pipefusion_degree == 1 and storage == "fp8_e4m3fn"