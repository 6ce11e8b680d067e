"""Convolutional auxiliaries (``fsl_fast.models.ConvAux``, e.g. resnet18's layer3 head): alignment
through the lowered trunk's hand-written forward-over-reverse pass (fsl_fast.ops.aux_conv), instead of
autograd's double backward."""
from __future__ import annotations

import torch

from fsl_fast.engines.executors.generic import DoubleBackwardAlign
from fsl_fast.models import ConvAux


class ConvAuxAlign(DoubleBackwardAlign):
    part, name = "alignment", "conv_aux_fast"

    @classmethod
    def matches(cls, eng):
        from fsl_fast.ops.aux_conv import lowerable

        if eng.aux is None:
            return False, "the algorithm has no auxiliary model"
        aux = eng.aux.template
        if not isinstance(aux, ConvAux):
            return False, f"the auxiliary is a {type(aux).__name__}, not a ConvAux"
        if not lowerable(aux.trunk):
            return False, "the ConvAux trunk has layers the lowered pass does not know"
        # One 1000-row step of the paper's layer3 head, 2 threads: this pass 462 ms in fp32,
        # autograd's double backward 831 ms (fp32) and 691 ms (bf16 autocast).
        return True, ("ConvAux: hand-written forward-over-reverse alignment pass per client "
                      f"(ops.aux_conv; convolution products in {'bf16' if eng.bf16 else 'fp32'})")

    def batch_grads(self, aux, Zb, Yb, Tb, n):
        from fsl_fast.ops.aux_conv import conv_align_grads

        gd = torch.bfloat16 if self.eng.bf16 else torch.float32
        _, grads = conv_align_grads(aux.trunk, aux.fc, Zb, Yb, Tb, grad_scale=Zb.shape[0] / n, gemm_dtype=gd)
        for p, g in zip(list(aux.trunk.parameters()) + [aux.fc.weight, aux.fc.bias], grads):
            p.grad.copy_(g)
