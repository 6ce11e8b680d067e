"""How the clients and the server talk: the :class:`~fsl_fast.transport.base.Channel` interface the
algorithms use, its in-process implementation (:mod:`fsl_fast.transport.local`) and its
torch.distributed one (:mod:`fsl_fast.transport.torchdist`, over :mod:`fsl_fast.transport.p2p`
and :mod:`fsl_fast.transport.topology`). Import the implementation you need from its module; this
package imports none of them."""
