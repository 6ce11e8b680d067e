"""The fused engine's executors, in the order the engine asks them (see ``base`` for the rule).

======== ============================================================ ===========================
part     executors, first match wins                                   files
======== ============================================================ ===========================
client   conv_blocks_taped, conv_blocks, vmap, loop                    conv_blocks.py, generic.py
server   mlp, autograd                                                 mlp_server.py, generic.py
aux      linear_closed_form, autograd                                  linear_aux.py, generic.py
alignment linear_closed_form, conv_aux_fast, double_backward           linear_aux.py, conv_aux.py,
                                                                       generic.py
full     conv_blocks_mlp_taped, conv_blocks_vmap_server, loop          conv_blocks.py, generic.py
======== ============================================================ ===========================
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
