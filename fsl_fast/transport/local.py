"""Clients and server in one process: a message is encoded, counted and decoded on the spot."""
from __future__ import annotations

import torch

from fsl_fast.transport.base import Channel

__all__ = ["InProcessChannel"]


class InProcessChannel(Channel):
    def upload(self, k: int, z: torch.Tensor, y: torch.Tensor):
        z = z.detach()
        if self.uplink.lossless:
            payload = z_srv = z
        else:
            payload, z_srv = self.encode(self.uplink, self.residual_up, k, z, self.stochastic_seed(k))
        self.count_upload(payload, y)
        return z_srv, payload

    def reply(self, k: int, g: torch.Tensor) -> torch.Tensor:
        if self.downlink.lossless:
            self.count_gradient(g)
            return g
        # its own stochastic-rounding keys: a bit flipped from the uplink's of the same upload
        payload, g_dec = self.encode(self.downlink, self.residual_down, k, g.detach(),
                                     self.stochastic_seed(k) ^ (1 << 30))
        self.count_gradient(payload)
        return g_dec

    def send_aux(self, ks) -> None:
        nbytes = self.engine.aux_bytes()
        for _ in ks:
            self.ledger.add("down", "aux_model", nbytes)

    def average(self, weights, clients: bool = True, aux: bool = False, servers: bool = False) -> None:
        self.engine.aggregate(weights, clients=clients, aux=aux, servers=servers)
