"""Is a Winograd convolution a way past the direct convolution's bf16 floor on this CPU?

For the two convolutions that dominate the paper-shape rounds (simple_conv's second convolution,
64->64 5x5 on 16x16 maps at batch 128; resnet18's layer1, 64->64 3x3 on 8x8 maps at batch 256)
and the tile sizes F(2x2, r) and F(4x4, r), this prints:

- the accuracy of the forward pass against float64, with the element-wise products in bf16 (the
  transformed inputs and weights rounded to bf16, accumulated in fp32: what an AVX-512 BF16 / AMX
  Winograd kernel would do) next to oneDNN's direct bf16 convolution;
- the time of the direct bf16 convolution, of the Winograd batched GEMM alone (its lower bound:
  the transforms cost nothing) and of the whole Winograd forward written with torch ops.

    python tools/winograd_probe.py [--threads 2]

The transform matrices come from the Toom-Cook construction over the interpolation points listed
per case (A^T and G in closed form, B^T solved from the bilinear identity in float64; the printed
residual checks it). Measurements: docs/PERF_NOTES.md ("A different algorithm: Winograd").
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F


def toom_cook(m: int, r: int, points: list[float]):
    """(A^T [m, a], G [a, r], B^T [a, a], residual) for F(m, r), a = m + r - 1, over the finite
    ``points`` and infinity."""
    a = m + r - 1
    if len(points) != a - 1:
        raise ValueError(f"F({m}, {r}) needs {a - 1} finite points, got {len(points)}")
    AT, G = np.zeros((m, a)), np.zeros((a, r))
    for i, p in enumerate(points):
        AT[:, i] = [p ** j for j in range(m)]
        G[i] = [p ** k / np.prod([p - q for q in points if q != p]) for k in range(r)]
    AT[m - 1, a - 1] = G[a - 1, r - 1] = 1.0
    # sum_i AT[j, i] G[i, k] BT[i, n] = [n == j + k] for every output j, tap k and input n
    rows, rhs = [], []
    for j in range(m):
        for k in range(r):
            for n in range(a):
                row = np.zeros((a, a))
                row[:, n] = AT[j] * G[:, k]
                rows.append(row.ravel())
                rhs.append(1.0 if n == j + k else 0.0)
    sol = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    residual = float(np.abs(np.array(rows) @ sol - np.array(rhs)).max())
    return AT, G, sol.reshape(a, a), residual


def _ms(fn, n=10) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def probe(name: str, N: int, C: int, H: int, r: int, m: int, points: list[float]) -> dict:
    AT, G, BT, residual = toom_cook(m, r, points)
    a, p, T = m + r - 1, r // 2, H // m
    AT, G, BT = (torch.tensor(v, dtype=torch.float32) for v in (AT, G, BT))
    gen = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(N, C, H, H, generator=gen))  # post-ReLU activations, as in the models
    w = torch.randn(C, C, r, r, generator=gen) / (C * r * r) ** 0.5
    U = torch.einsum("ak,oikl,bl->abio", G, w, G).reshape(a * a, C, C).bfloat16()  # [points, Cin, Cout]

    def winograd():
        tiles = F.pad(x, (p, p, p, p)).unfold(2, a, m).unfold(3, a, m)        # [N, C, T, T, a, a]
        V = torch.einsum("ai,nctsij,bj->abntsc", BT, tiles, BT).reshape(a * a, N * T * T, C)
        M = torch.bmm(V.bfloat16(), U).float().view(a, a, N, T, T, C)
        return torch.einsum("ia,abntsc,jb->nctisj", AT, M, AT).reshape(N, C, H, H)

    ref = F.conv2d(x.double(), w.double(), padding=p)

    def rel(y):
        return float((y.double() - ref).norm() / ref.norm())

    xb, wb = x.bfloat16(), w.bfloat16()
    V = torch.randn(a * a, N * T * T, C).bfloat16()
    out = dict(case=f"{name}: F({m}x{m}, {r}x{r}), {a * a} points", residual=residual,
               err_direct=rel(F.conv2d(xb, wb, padding=p)), err_winograd=rel(winograd()),
               ms_direct=_ms(lambda: F.conv2d(xb, wb, padding=p)), ms_gemm=_ms(lambda: torch.bmm(V, U)),
               ms_torch=_ms(winograd, 3))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [("simple_conv conv2, B=128", 128, 64, 16, 5, 2, [0, 1, -1, 2, -2]),
             ("simple_conv conv2, B=128", 128, 64, 16, 5, 4, [0, 1, -1, 2, -2, 0.5, -0.5]),
             ("resnet18 layer1, B=256", 256, 64, 8, 3, 2, [0, 1, -1]),
             ("resnet18 layer1, B=256", 256, 64, 8, 3, 4, [0, 1, -1, 2, -2])]
    print(f"{args.threads} thread(s); forward pass; error = |y - y_fp64| / |y_fp64|\n")
    print("| case | bf16 direct error | Winograd (bf16 products) error | direct bf16 ms | "
          "Winograd GEMM alone ms | Winograd in torch ops ms |")
    print("|---|---|---|---|---|---|")
    for c in cases:
        o = probe(*c)
        assert o["residual"] < 1e-9, o
        print(f"| {o['case']} | {o['err_direct']:.1e} | {o['err_winograd']:.1e} | {o['ms_direct']:.2f} | "
              f"{o['ms_gemm']:.2f} | {o['ms_torch']:.1f} |")


if __name__ == "__main__":
    main()
