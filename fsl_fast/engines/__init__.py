"""Engines: how a round is computed. ``reference`` is plain PyTorch (the ground truth); ``fused``
advances all clients together over flat buffers with the fused ops."""


def build_engine(cfg, split, num_clients, algorithm_cls, device):
    if getattr(cfg, "client_store", "off") != "off":
        from fsl_fast.engines.store import SlotEngine

        return SlotEngine(cfg, split, num_clients, algorithm_cls, device)
    if cfg.fused:
        from fsl_fast.engines.fused import FusedEngine

        return FusedEngine(cfg, split, num_clients, algorithm_cls, device)
    from fsl_fast.engines.reference import ReferenceEngine

    return ReferenceEngine(cfg, split, num_clients, algorithm_cls, device)
