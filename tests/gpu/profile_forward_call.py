"""Where the time of one stepwise model call goes, outside the model: Engine.forward on a tiny Flux (so the
forward itself is short) with a 1024 px latent (1x16x128x128), x on the GPU as ComfyUI holds it and on the CPU.

    python tests/gpu/profile_forward_call.py [--calls 50] [--gpus 1]

Prints medians in ms: the whole call, the workers' own time (the reply's elapsed), sending the request
(shared memory + socket, in this process), and the rest (the workers' receive, validation, relay and reply,
and this process's wait and read).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--gpus", type=int, default=1)
    args = parser.parse_args()
    import torch

    from comfy_xdit.client import Engine, ModelHandle
    from tests.flux_tiny import tiny_checkpoint

    path, model = tiny_checkpoint(tempfile.mkdtemp(prefix="cxd-profile-"), seed=1)
    config = dict(model.config)
    engine = Engine()
    handle = ModelHandle(path=path, dtype="bf16", gpus=args.gpus)
    pool = engine.pool(args.gpus)
    timings = []
    call, send = pool._call, pool._send

    def timed_send(*a, **k):
        t = time.perf_counter()
        send(*a, **k)
        timings[-1]["send"] = time.perf_counter() - t

    def timed_call(kind, *a, **k):
        timings.append({})
        t = time.perf_counter()
        reply = call(kind, *a, **k)
        timings[-1].update(call=time.perf_counter() - t, worker=reply[0].get("elapsed", 0.0))
        return reply

    pool._call, pool._send = timed_call, timed_send
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cond = dict(context=torch.randn(1, 512, config["joint_attention_dim"]).bfloat16(),
                y=torch.randn(1, config["pooled_projection_dim"]).bfloat16(), guidance=torch.full((1,), 3.5))
    for where in (device, "cpu"):
        x = torch.randn(1, 16, 128, 128, device=where).bfloat16()
        t = torch.tensor([0.5], device=where)
        for i in range(args.calls + 5):
            if i == 5:
                timings.clear()
            engine.forward(handle, x, t, [(f"profile-{where}", 1, cond)], new_run=(i == 0))
        med = {k: 1000 * statistics.median(d[k] for d in timings) for k in ("call", "worker", "send")}
        rest = statistics.median(1000 * (d["call"] - d["worker"] - d["send"]) for d in timings)
        print(f"x on {where}: call {med['call']:.2f} ms, workers {med['worker']:.2f}, send {med['send']:.2f}, "
              f"rest {rest:.2f}", flush=True)
    engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
