"""One attention processor for diffusers' MM-DiT attention modules (Flux's FluxAttention, SD3's Attention):
the projections, q/k norms and RoPE stay diffusers' modules; only the attention call is swapped for the
sequence-parallel one (USP, or PipeFusion's stale-K/V attention).

The joint sequence is always [text | image] here (SD3's own processor puts the image first; attention has
no mask, so the order changes only rounding). Which modules see text is the family's word (see
Family.attention_modules): joint modules take it as encoder_hidden_states or, as Flux's single blocks,
inside hidden_states; image-only modules (SD3.5's attn2) never count replicated text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.embeddings import apply_rotary_emb


@dataclass
class ShardState:
    """Per-forward facts the processors need, set by the runner: the attention callable
    (q, k, v [b, s, h, d], replicated_text_len) -> out, and how many leading text tokens every rank holds
    whole (0 when the text is split with the image tokens)."""

    attention: object
    replicated_text_len: int = 0
    cross: object = None         # (q, k, v) -> out for sharded queries and replicated K/V (cross-attention)
    image_context_len: int = 0   # Wan I2V: leading context tokens that are CLIP-vision, not text


def apply_rope(x: torch.Tensor, rope: tuple) -> torch.Tensor:
    """RoPE on [B, S, H, D] over adjacent pairs: rope is (cos, sin) [S, D] repeated per pair (diffusers' real form,
    Flux / SD3), or (freqs,) complex [S, D / 2] (one complex multiply in fp32, ~2x less memory traffic in eager
    mode: Qwen-Image's long joint sequences)."""
    if len(rope) == 1:
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * rope[0][None, :, None, :]).flatten(3).to(x.dtype)
    return apply_rotary_emb(x, rope, sequence_dim=1)


class JointAttnProcessor:
    """diffusers' Flux / SD3 joint attention with the attention call swapped for state.attention.

    image_only: the module attends over image tokens alone (SD3.5 Medium's attn2), so replicated text is not
    in its sequence; every other module's sequence starts with the text (as encoder_hidden_states, or inside
    hidden_states as in Flux's single blocks)."""

    def __init__(self, state: ShardState, image_only: bool = False):
        self.state = state
        self.image_only = image_only

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 encoder_hidden_states_mask=None, **_unused):
        if attention_mask is not None or encoder_hidden_states_mask is not None:
            raise NotImplementedError("attention masks are not supported under sequence parallelism")
        q, k, v = (proj(hidden_states).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        text_len = 0
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            eq, ek, ev = (proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q, k = apply_rope(q, image_rotary_emb), apply_rope(k, image_rotary_emb)

        replicated = 0 if self.image_only else self.state.replicated_text_len
        out = self.state.attention(q, k, v, replicated_text_len=replicated).flatten(2, 3).to(q.dtype)
        text_out, out = out[:, :text_len], out[:, text_len:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        if encoder_hidden_states is None:
            return out
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out.contiguous())
        return out, text_out
