"""Distributed runtime: server and clients in separate processes (or machines) on torch.distributed.

Launch with torchrun (docs/distributed.md has the multi-machine form)::

    torchrun --nproc-per-node 3 -m fsl_fast.train --distributed --schedule parallel ...

Every rank builds the same run from the same config and seed and executes the same algorithm
round loop (SPMD); rank 0 is the server and the FedAvg aggregator, ranks 1..R-1 host the clients
in contiguous blocks. The pieces, one job each:

- :mod:`fsl_fast.transport.topology`: which rank hosts which client;
- :mod:`fsl_fast.transport.p2p`: point-to-point messages and collectives with headers, checks,
  timeouts, liveness and byte counters;
- :mod:`fsl_fast.transport.torchdist`: the algorithms' channel over it (uploads, gradients,
  aligned auxiliaries, FedAvg over ranks);
- :mod:`fsl_fast.distributed.engine`: the engine wrapper (each rank computes what it owns) and
  :func:`attach`;
- :mod:`fsl_fast.distributed.driver`: start, round loop, checkpoint shards, resume, failures.
"""
import torch.distributed as dist  # the module the transport sends through (tests patch its isend/irecv)

from fsl_fast.distributed.driver import MANIFEST, train_distributed
from fsl_fast.distributed.engine import DistributedEngine, attach
from fsl_fast.transport.p2p import DistributedError, PeerLost, Transport
from fsl_fast.transport.topology import Topology, client_blocks

__all__ = ["DistributedError", "PeerLost", "Topology", "client_blocks", "Transport", "DistributedEngine",
           "attach", "train_distributed", "MANIFEST", "dist"]
