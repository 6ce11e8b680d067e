"""What one client holds in memory under each algorithm (docs/RESULTS.md, "The paper's claims").

Per algorithm: the model state a client keeps between steps (parameters, and the optimizer's two
Adam moments for what it trains), and the activations one local step saves for its backward pass
at batch size B, counted exactly with ``torch.autograd.graph.saved_tensors_hooks`` (the bytes of
every distinct tensor storage autograd keeps; fp32, the reference engine's modules):

- FedAvg: the whole model, trained locally (Adam over client and server half);
- SplitFed v1 / v2: the client half (Adam), its forward saved until the server's gradient arrives;
- CSE-FSL: client half and auxiliary, both trained locally (Adam over both);
- FSL-SAGE: client half (Adam) and the auxiliary, which the client only evaluates (the server
  trains it), so no moments for it; the step saves the client forward and the auxiliary's pass
  that differentiates the loss with respect to the smashed data.

    python tools/client_memory.py [--model resnet18 --aux layer3 --shape 3x32x32 --batch 256]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from fsl_fast.models import build_split_model


def _params(*mods) -> int:
    return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure(model: str, aux: str, shape: tuple, batch: int, classes: int = 10) -> list[dict]:
    torch.manual_seed(0)
    split = build_split_model(model, shape, classes, aux=aux)
    c, s, a = split.client, split.server, split.aux
    for m in (c, s, a):
        m.train()
    x = torch.randn((batch,) + shape)
    y = torch.randint(0, classes, (batch,))

    def whole():
        F.cross_entropy(s(c(x)), y).backward()

    def client_only():
        c(x).sum().backward()

    def client_and_aux():  # the client forward, then d CE(aux(z), y)/dz through the auxiliary
        z = c(x)
        zd = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(a(zd), y), zd)
        z.backward(g)

    act_whole, act_client, act_aux = _saved_bytes(whole), _saved_bytes(client_only), _saved_bytes(client_and_aux)
    pc, ps, pa = _params(c), _params(s), _params(a)
    rows = [
        ("FedAvg", pc + ps, 2 * (pc + ps), act_whole),
        ("SplitFed v1 / v2", pc, 2 * pc, act_client),
        ("CSE-FSL", pc + pa, 2 * (pc + pa), act_aux),
        ("FSL-SAGE", pc + pa, 2 * pc, act_aux),
    ]
    return [{"algorithm": n, "params": p, "moments": mo, "activations": act, "total": p + mo + act}
            for n, p, mo, act in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/client_memory.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--aux", default="layer3")
    p.add_argument("--shape", default="3x32x32")
    p.add_argument("--batch", type=int, default=256)
    a = p.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.split("x"))
    rows = measure(a.model, a.aux, shape, a.batch)
    mib = 2 ** 20
    print(f"{a.model} (aux {a.aux}), input {a.shape}, B = {a.batch}, fp32; MiB\n")
    print("| algorithm | parameters held | Adam moments | activations saved by one step | total | vs FedAvg |")
    print("|---|---|---|---|---|---|")
    base = rows[0]["total"]
    for r in rows:
        print(f"| {r['algorithm']} | {r['params'] / mib:.1f} | {r['moments'] / mib:.1f} | {r['activations'] / mib:.1f} | "
              f"{r['total'] / mib:.1f} | {r['total'] / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
