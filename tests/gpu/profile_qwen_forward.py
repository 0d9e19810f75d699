"""One Qwen-Image forward at 1328x1328 on one GPU (random full-size weights, bf16, batch 2 as the Sampler (xDiT)
batches cond and uncond): diffusers' own forward against the pack's, with RoPE in diffusers' real (cos, sin)
form and as complex frequencies, eager and regionally compiled. Run from the repository root:
    python3 tests/gpu/profile_qwen_forward.py [--out DIR] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from comfy_xdit.models.dit import DiTModel
from comfy_xdit.models.qwen import QWEN
from comfy_xdit.models.qwen.family import pack


def timed(fn, n=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "out/gpu"))
    p.add_argument("--px", type=int, default=1328)
    p.add_argument("--text", type=int, default=128)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev, dt = torch.device("cuda"), torch.bfloat16
    config = QWEN.preset_config("qwen-image")
    transformer = QWEN.random(config, dtype=dt, device=dev)
    theirs = copy.deepcopy(transformer)  # before our processors go in: diffusers' own processor and RoPE
    ours = DiTModel(QWEN, transformer)
    h = w = args.px // 8
    b = 2
    x = torch.randn(b, 16, 1, h, w, device=dev, dtype=dt)
    ctx = torch.randn(b, args.text, 3584, device=dev, dtype=dt)
    sigma = torch.full((b,), 0.7, device=dev)
    lines = []

    def say(line):
        lines.append(line)
        print(line, flush=True)

    with torch.inference_mode():
        packed = pack(x[:, :, 0])
        d = timed(lambda: theirs(hidden_states=packed, encoder_hidden_states=ctx, timestep=sigma,
                                 img_shapes=[(1, h // 2, w // 2)] * b, return_dict=False))
        say(f"{args.px} px, text {args.text}, batch {b}: diffusers eager {d * 1000:.1f} ms a forward")
        del theirs
        outs = {}
        for compiled in ((False, True) if not args.no_compile else (False,)):
            if compiled:
                ours.compile_blocks()
            for form in (False, True):
                QWEN.complex_rope = form
                transformer.compiled_blocks = compiled and not form  # the forms as asked, compiled or not
                t0 = time.perf_counter()
                outs[(compiled, form)] = ours.forward(x, sigma, {"context": ctx}).float()
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                a = timed(lambda: ours.forward(x, sigma, {"context": ctx}))
                say(f"ours {'compiled' if compiled else 'eager'}, rope {'complex' if form else 'real'}: "
                    f"{a * 1000:.1f} ms a forward (first call {first:.1f} s)")
        ref = outs[(False, False)]
        for key, out in outs.items():
            say(f"  {key}: rel diff to eager real {float((out - ref).norm() / ref.norm()):.2e}")
    with open(os.path.join(args.out, "profile_qwen_forward.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
