"""Which process hosts which client in a distributed run: rank 0 is the server, ranks 1..R-1
hold the clients in contiguous blocks."""
from __future__ import annotations

from fsl_fast.config import ConfigError

__all__ = ["client_blocks", "Topology"]


def client_blocks(num_clients: int, world_size: int) -> list[range]:
    """Clients of each rank: rank 0 (the server) none, ranks 1..R-1 contiguous blocks whose sizes
    differ by at most one (the first ``m % (R-1)`` client ranks take one more)."""
    if world_size < 2:
        raise ConfigError(f"--distributed: needs at least 2 processes (server + 1 client rank), "
                          f"got world size {world_size}")
    nr = world_size - 1
    if num_clients < nr:
        raise ConfigError(f"--clients: {num_clients} clients cannot fill {nr} client ranks; "
                          f"use at least {nr} clients or fewer processes")
    base, extra = divmod(num_clients, nr)
    out, start = [range(0)], 0
    for r in range(nr):
        n = base + (1 if r < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class Topology:
    def __init__(self, rank: int, world_size: int, num_clients: int):
        self.rank = rank
        self.world_size = world_size
        self.blocks = client_blocks(num_clients, world_size)
        self._owner = {k: r for r, b in enumerate(self.blocks) for k in b}
        self.live = list(range(world_size))  # ranks still in the run (--tolerate-dropouts drops some)

    def drop(self, ranks) -> None:
        self.live = [r for r in self.live if r not in set(ranks)]

    @property
    def is_server(self) -> bool:
        return self.rank == 0

    def owner(self, k: int) -> int:
        return self._owner[k]

    def hosts(self, k: int) -> bool:
        return self._owner[k] == self.rank

    @property
    def local_clients(self) -> range:
        return self.blocks[self.rank]
