"""USP attention (Ulysses all-to-all over heads x Ring rotation of K/V) through yunchang.

Every rank holds a contiguous shard of the joint sequence. Two ways to hold the text
(joint) tokens of an MM-DiT:
- split: the text shards with the image tokens, and the local sequence is simply
  [text shard, image shard]. Attention has no mask, so the order in which shards meet
  does not matter and yunchang's LongContextAttention is exact as it stands.
- replicated: every rank holds all text tokens (the text length does not divide the
  sequence-parallel degree). Text K/V then joins only the first, local ring step so it
  is counted once, and the text queries ride along every ring step with their partial
  (out, lse) merged here; their head slices are gathered over the Ulysses group.

Cross-attention (Wan, PixArt, HunyuanDiT: image/video queries, text K/V that every rank holds
whole) takes USPAttention.cross: only Q and the output cross the Ulysses group, and each rank
slices its head range of the replicated K/V itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from yunchang.comm.all_to_all import SeqAllToAll4D
from yunchang.hybrid.attn_layer import LongContextAttention
from yunchang.hybrid.utils import RING_IMPL_DICT
from yunchang.ring.utils import update_out_and_lse

from .kernels import Kernel


class _ExplicitGroupAttention(LongContextAttention):
    """LongContextAttention with its groups passed in, not read from yunchang's globals."""

    def __init__(self, ulysses_group: dist.ProcessGroup, ring_group: dist.ProcessGroup):
        torch.nn.Module.__init__(self)
        self.ulysses_pg = ulysses_group
        self.ring_pg = ring_group
        self.use_pack_qkv = False
        self.use_sync = False
        self.attn_type = None  # with attn_type None yunchang calls attn_processor for every ring step
        self.attn_processor = None
        self.scatter_idx = 2
        self.gather_idx = 1
        self.ring_attn_fn = RING_IMPL_DICT["basic"]

    def forward(self, query, key, value, softmax_scale=None):
        # One all-to-all for Q, K and V needs one shape for all three; with one Ulysses rank there is none to send.
        if not (query.shape == key.shape == value.shape and dist.get_world_size(self.ulysses_pg) > 1):
            return super().forward(query, key, value, softmax_scale=softmax_scale)
        q, k, v = _heads_all_to_all(query, key, value, group=self.ulysses_pg)
        out = self.ring_attn_fn(q, k, v, softmax_scale=softmax_scale, causal=False, group=self.ring_pg,
                                attn_type=None, attn_processor=self.attn_processor)
        out = out[0] if isinstance(out, tuple) else out
        return SeqAllToAll4D.apply(self.ulysses_pg, out, self.gather_idx, self.scatter_idx, False)


def _heads_all_to_all(*tensors, group: dist.ProcessGroup):
    """One all-to-all for any number of same-shape tensors (Q, K and V: yunchang sends three; Q alone for
    cross-attention): [b, s/P, h, d] each -> [b, s, h/P, d] each.

    Packed as [P, s/P, n, b, h/P, d], so one copy in; the received buffer has the same layout and
    each tensor is a strided view of it (rows n apart), with no copy out. Functional collectives,
    so torch.compile keeps it inside a block's graph.
    """
    p = dist.get_world_size(group)
    b, s, h, d = tensors[0].shape
    n = len(tensors)
    send = torch.stack([t.reshape(b, s, p, h // p, d).permute(2, 1, 0, 3, 4) for t in tensors], dim=2)
    recv = funcol.wait_tensor(funcol.all_to_all_single(send.contiguous(), None, None, group))
    recv = recv.view(p * s, n, b, h // p, d)  # [P, s/P] -> full sequence: shard-major, as yunchang orders it
    return tuple(recv[:, i].transpose(0, 1) for i in range(n))


def _out_all_to_all(out, group: dist.ProcessGroup):
    """The way back: [b, s, h/P, d] (whole sequence, this rank's heads) -> [b, s/P, h, d]."""
    p = dist.get_world_size(group)
    b, s, hp, d = out.shape
    send = out.reshape(b, p, s // p, hp, d).permute(1, 2, 0, 3, 4)  # [dest shard, s/P, b, h/P, d]
    recv = funcol.wait_tensor(funcol.all_to_all_single(send.contiguous(), None, None, group))
    return recv.permute(2, 1, 0, 3, 4).reshape(b, s // p, p * hp, d)  # heads in source (head group) order


class _JointTextRingStep:
    """Ring-step kernel for replicated text: text K/V on the first step only, text Q on every step."""

    def __init__(self, kernel: Kernel, text_q, text_k, text_v):
        self.kernel = kernel
        self.text_q, self.text_k, self.text_v = text_q, text_k, text_v
        self.first_step = True
        self.text_out = None
        self.text_lse = None

    def __call__(self, q, k, v, softmax_scale=None, **_ignored):
        if self.first_step:  # yunchang's ring calls the local (unrotated) K/V first
            k = torch.cat([self.text_k, k], dim=1)
            v = torch.cat([self.text_v, v], dim=1)
            self.first_step = False
        text_len = self.text_q.shape[1]
        out, lse = self.kernel(torch.cat([self.text_q, q], dim=1), k, v, softmax_scale=softmax_scale)
        self.text_out, self.text_lse = update_out_and_lse(
            self.text_out, self.text_lse, out[:, :text_len], lse[..., :text_len])
        return out[:, text_len:], lse[..., text_len:]


class USPAttention:
    """Callable on [batch, seq_local, heads, head_dim] q/k/v; returns the same layout."""

    def __init__(self, ulysses_group: dist.ProcessGroup, ring_group: dist.ProcessGroup, kernel: Kernel):
        self.ulysses_group = ulysses_group
        self.ulysses_degree = dist.get_world_size(ulysses_group)
        self.ulysses_rank = dist.get_rank(ulysses_group)
        self.ring_degree = dist.get_world_size(ring_group)
        self.kernel = kernel
        self._attn = _ExplicitGroupAttention(ulysses_group, ring_group)

    def __call__(self, q, k, v, replicated_text_len: int = 0, softmax_scale=None):
        if self.ring_degree == 1 and not replicated_text_len and q.shape == k.shape:
            return self._ulysses(q, k, v, softmax_scale)
        return self._ring(q, k, v, replicated_text_len, softmax_scale)

    def _ulysses(self, q, k, v, softmax_scale):
        """Ulysses alone: all-to-all, one kernel call, all-to-all; no ring merge. Traceable, so a compiled
        block is one graph (the collectives are functional, the kernel an aten op)."""
        q, k, v = _heads_all_to_all(q, k, v, group=self.ulysses_group)
        out, _ = self.kernel(q, k, v, softmax_scale=softmax_scale, need_lse=False)  # no ring merge: no LSE
        return _out_all_to_all(out, self.ulysses_group)

    def cross(self, q, k, v, softmax_scale=None):
        """Cross-attention of sharded queries to replicated K/V.

        q: [batch, seq_local, heads, head_dim], this rank's shard of the query tokens; k/v:
        [batch, text_len, heads, head_dim], whole on every rank. Returns q's layout. Only Q and the
        output cross the Ulysses group; K/V never do (each rank already holds them all, so it slices
        the head range its Q all-to-all brought it). No ring: every ring rank holds all of K/V, so it
        attends locally. Traceable like _ulysses.
        """
        if self.ulysses_degree == 1:
            return self.kernel(q, k, v, softmax_scale=softmax_scale, need_lse=False)[0]
        (q,) = _heads_all_to_all(q, group=self.ulysses_group)
        heads = q.shape[2]  # this rank's head count after the all-to-all: heads / ulysses degree
        h0 = self.ulysses_rank * heads  # the all-to-all sends head chunk r to Ulysses rank r
        out, _ = self.kernel(q, k[:, :, h0:h0 + heads], v[:, :, h0:h0 + heads], softmax_scale=softmax_scale,
                             need_lse=False)
        return _out_all_to_all(out, self.ulysses_group)

    @torch.compiler.disable  # collectives and the ring loop stay eager inside compiled blocks
    def _ring(self, q, k, v, replicated_text_len: int = 0, softmax_scale=None):
        if not replicated_text_len:
            self._attn.attn_processor = self.kernel
            return self._attn(q, k, v, softmax_scale=softmax_scale)

        t = replicated_text_len
        # After the all-to-all this rank holds head chunk `ulysses_rank` of the image tokens.
        heads = q.shape[2] // self.ulysses_degree
        h0 = self.ulysses_rank * heads
        step = _JointTextRingStep(self.kernel, *(x[:, :t, h0:h0 + heads] for x in (q, k, v)))
        self._attn.attn_processor = step
        image_out = self._attn(q[:, t:], k[:, t:], v[:, t:], softmax_scale=softmax_scale)
        text_out = step.text_out.to(q.dtype)
        if self.ulysses_degree > 1:
            chunks = [torch.empty_like(text_out) for _ in range(self.ulysses_degree)]
            dist.all_gather(chunks, text_out.contiguous(), group=self.ulysses_group)
            text_out = torch.cat(chunks, dim=2)
        return torch.cat([text_out, image_out], dim=1)
