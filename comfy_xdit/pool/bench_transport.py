"""Round-trip cost of the pool's transport (authenticated Unix socket + shared memory).

    python -m comfy_xdit.pool.bench_transport [--repeats 20]

Two processes, the real Channel on both ends: a 1024px Flux request's tensors (T5 context
1x512x4096, pooled 1x768, latent 1x16x128x128, fp32) in and the latent out; and a
4096x4096 IMAGE (float32 [1, 4096, 4096, 3], 201 MB) returned. Prints milliseconds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

from .protocol import REPLY_TYPES, REQUEST_TYPES, Channel, accept, connect, listen, make_private_dir, new_pool_id, \
    new_secret


def _server(path: str, secret: bytes, pool_id: str, ready) -> None:
    listener = listen(path, secret)
    ready.set()
    channel = Channel(accept(listener), pool_id, REQUEST_TYPES)
    images: dict[int, torch.Tensor] = {}  # made once, so only the transport is timed
    while True:
        msg, tensors = channel.recv()
        if msg["type"] == "shutdown":
            return
        if msg["args"].get("reply") == "latent":
            out = {"samples": tensors["latent"]}
        else:
            size = msg["args"]["image_px"]
            if size not in images:
                images[size] = torch.rand(1, size, size, 3)
            out = {"images": images[size]}
        channel.send({"type": "ok", "id": msg["id"], "args": {}}, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--image-px", type=int, default=4096)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    directory, secret, pool_id = make_private_dir("cxd-bench-"), new_secret(), new_pool_id()
    path = os.path.join(directory, "bench.sock")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=_server, args=(path, secret, pool_id, ready), daemon=True)
    server.start()
    ready.wait(60)
    channel = Channel(connect(path, secret, timeout=30), pool_id, REPLY_TYPES)
    request = {"context": torch.randn(1, 512, 4096), "pooled": torch.randn(1, 768),
               "latent": torch.randn(1, 16, 128, 128)}

    def round_trip(reply: str) -> float:
        start = time.perf_counter()
        channel.send({"type": "sample", "id": 1, "args": {"reply": reply, "image_px": args.image_px}},
                     request if reply == "latent" else None)
        channel.recv(timeout=60)
        return (time.perf_counter() - start) * 1e3

    results = {}
    for name in ("latent", "image"):
        round_trip(name)  # warm-up: first touches of shared memory pages
        times = [round_trip(name) for _ in range(args.repeats)]
        results[name] = (statistics.median(times), min(times))
    channel.send({"type": "shutdown", "id": 2, "args": {}})
    server.join(10)
    in_mb = sum(t.numel() * 4 for t in request.values()) / 1e6
    print(f"1024px request ({in_mb:.1f} MB in, 4.2 MB out): median {results['latent'][0]:.2f} ms, "
          f"best {results['latent'][1]:.2f} ms")
    px = args.image_px
    print(f"{px}x{px} IMAGE back ({px * px * 12 / 1e6:.0f} MB): "
          f"median {results['image'][0]:.1f} ms, best {results['image'][1]:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
