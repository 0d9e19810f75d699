"""Per-layer K/V over the whole joint sequence: a patch's Q attends to it after writing its own K/V in.

Fresh for the patches this stage already ran this step, one step stale for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PatchWindow:
    """Where the running patch sits in the joint sequence; one per stage, moved by the runner.

    cache maps layer -> (k, v) [batch, seq, heads, head_dim]; it belongs to one denoiser, so two
    denoisers on one model (cond and uncond) never see each other's K/V.
    """

    start: int = 0
    stop: int = 0
    full: bool = True
    cache: dict = field(default_factory=dict)
    text_len: int = 0  # text tokens leading the rank's joint sequence (image-only layers' buffers skip them)


class StaleKVAttention:
    """Attention callable with the USP signature (q, k, v [b, s, h, d] -> out [b, s, h, d]) for one layer.

    attend: the attention over (patch Q, whole buffer K/V); USP attention when the stage is sequence
    parallel (each rank's buffer then holds its slice of every patch), else plain SDPA. image_only: the
    layer attends over image tokens alone (SD3.5's attn2), so its buffer is the image part of the sequence.
    """

    def __init__(self, window: PatchWindow, layer: int, attend=None, image_only: bool = False):
        self.window = window
        self.layer = layer
        self.attend = attend
        self.image_only = image_only

    @torch.compiler.disable  # writes into the shared buffer: eager between a compiled block's graphs
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, replicated_text_len: int = 0):
        w = self.window
        if w.full:
            # a full step's K/V become the next patched step's buffer; own copies, not views pinning fused qkv
            w.cache[self.layer] = (k.contiguous(), v.contiguous())
            keys, values = w.cache[self.layer]
        else:
            if self.layer not in w.cache:
                raise RuntimeError("patched PipeFusion step without a filled K/V buffer: warmup_steps must be >= 1")
            keys, values = w.cache[self.layer]
            start, stop = w.start, w.stop
            if self.image_only:  # the patch's image tokens only (the first patch leads with the text)
                start, stop = max(start, w.text_len) - w.text_len, stop - w.text_len
            keys[:, start:stop] = k
            values[:, start:stop] = v
        if self.attend is not None:
            return self.attend(q, keys, values)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        return out.transpose(1, 2)
