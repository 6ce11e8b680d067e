"""The fused engine's executors, in the order the engine asks them (see ``base`` for the rule).

- client: conv_blocks_taped, conv_blocks (conv_blocks.py), vmap, loop (generic.py)
- server: mlp (mlp_server.py), autograd (generic.py)
- aux: linear_closed_form (linear_aux.py), autograd (generic.py)
- alignment: linear_closed_form (linear_aux.py), conv_aux_fast (conv_aux.py), double_backward
  (generic.py)
- full (FedAvg's whole-model step): conv_blocks_mlp_taped, conv_blocks_vmap_server
  (conv_blocks.py), loop (generic.py)
"""
from fsl_fast.engines.executors.base import ENV_FORCE, PARTS, ExecutorError, choose, forced  # noqa: F401
from fsl_fast.engines.executors.conv_aux import ConvAuxAlign
from fsl_fast.engines.executors.conv_blocks import (GroupedConvBlocks, GroupedVmapFull, TapedConvBlocks,
                                                    TapedMLPFull)
from fsl_fast.engines.executors.generic import (AutogradAux, AutogradServer, DoubleBackwardAlign, LoopClients,
                                                LoopFull, VmapClients)
from fsl_fast.engines.executors.linear_aux import LinearAlign, LinearAuxExecutor
from fsl_fast.engines.executors.mlp_server import MLPServer

CANDIDATES = {
    "client": [TapedConvBlocks, GroupedConvBlocks, VmapClients, LoopClients],
    "server": [MLPServer, AutogradServer],
    "aux": [LinearAuxExecutor, AutogradAux],
    "alignment": [LinearAlign, ConvAuxAlign, DoubleBackwardAlign],
    "full": [TapedMLPFull, GroupedVmapFull, LoopFull],
}


def names(part: str) -> list[str]:
    return [c.name for c in CANDIDATES[part]]
