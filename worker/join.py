"""Join another machine's ranks to a pool whose controller runs elsewhere (multi-node).

Run on each extra machine, after the controller has been started with nnodes > 1:

    python -m worker.join --nnodes 2 --node-rank 1 --nproc-per-node 8 \
        --master-addr <controller machine> --master-port <its port> [--device cuda]

It runs torchrun's static rendezvous with the same worker program; the ranks here exit
when the pool shuts down or its rank 0 goes away.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--node-rank", type=int, required=True)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args(argv)
    if not 0 < args.node_rank < args.nnodes:
        p.error("--node-rank must be between 1 and nnodes - 1 (node 0 is the controller's machine)")
    env = dict(os.environ, CXD_POOL_DIR=tempfile.mkdtemp(prefix="cxd-join-"), CXD_DEVICE=args.device,
               PYTHONPATH=os.pathsep.join([REPO_ROOT] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(args.nnodes), "--node-rank",
           str(args.node_rank), "--nproc-per-node", str(args.nproc_per_node), "--master-addr", args.master_addr,
           "--master-port", str(args.master_port), "--max-restarts", "0", "-m", "worker"]
    return subprocess.call(cmd, cwd=REPO_ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
