"""Start the processes of a distributed run on this machine, without torchrun.

    python -m fsl_fast.launch --nproc-per-node 3 --tolerate-dropouts --algorithm fsl_sage ...

Every argument the launcher does not know goes to ``python -m fsl_fast.train --distributed``.
torchrun's agent stops every worker as soon as one fails; this launcher does not: a client rank
that dies is reported, and the others carry on (with ``--tolerate-dropouts`` the run drops that
rank's clients; without it the survivors fail on their own within ``--dist-timeout``, naming the
rank). If the server (rank 0) fails, the launcher stops the rest of this machine's ranks.

Several machines: one launcher per machine, with the same ``--nnodes``, ``--master-addr`` (the
machine of rank 0, which hosts the key-value store) and ``--master-port``, and its own
``--node-rank``; ranks are numbered node by node. The exit status is rank 0's where rank 0 runs,
elsewhere the first non-zero status of this machine's ranks that did not die from a signal.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fsl_fast.launch", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--nproc-per-node", type=int, required=True, help="processes on this machine")
    p.add_argument("--nnodes", type=int, default=1, help="machines (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of the machine hosting rank 0")
    p.add_argument("--master-port", type=int, default=0, help="port of rank 0's store (0: a free port; "
                   "single machine only)")
    return p


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"ended by {signal.Signals(-code).name}"
        except ValueError:
            return f"ended by signal {-code}"
    return f"exited with status {code}"


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    if args.nproc_per_node < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        print("error: fsl_fast.launch: need --nproc-per-node >= 1, --nnodes >= 1 and "
              "0 <= --node-rank < --nnodes", file=sys.stderr)
        return 2
    if args.master_port == 0:
        if args.nnodes > 1:
            print("error: fsl_fast.launch: --master-port is required with several machines", file=sys.stderr)
            return 2
        args.master_port = _free_port()
    world = args.nproc_per_node * args.nnodes
    first = args.node_rank * args.nproc_per_node
    procs: dict[int, subprocess.Popen] = {}
    for local in range(args.nproc_per_node):
        rank = first + local
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local),
                   LOCAL_WORLD_SIZE=str(args.nproc_per_node), MASTER_ADDR=args.master_addr,
                   MASTER_PORT=str(args.master_port))
        for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE"):
            env.pop(k, None)
        procs[rank] = subprocess.Popen([sys.executable, "-m", "fsl_fast.train", "--distributed"] + rest,
                                       env=env)

    def forward(signum, frame):
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes: dict[int, int] = {}
    while len(codes) < len(procs):
        for rank, p in procs.items():
            if rank in codes or p.poll() is None:
                continue
            codes[rank] = p.returncode
            if p.returncode != 0:
                print(f"fsl_fast.launch: rank {rank} {_describe(p.returncode)}", file=sys.stderr, flush=True)
            if rank == 0 and p.returncode != 0:
                # No server, no run: stop this machine's other ranks (they would time out anyway).
                for q in procs.values():
                    if q.poll() is None:
                        q.terminate()
        time.sleep(0.05)
    if 0 in codes:
        return codes[0]
    return next((c for c in codes.values() if c > 0), 0)


if __name__ == "__main__":
    sys.exit(main())
