"""Seconds per fsl_sage round on the GPU: reference engine vs fused engine (resnet18 + layer3
auxiliary, 10 clients, synthetic 3x32x32, batch 32), after a warm-up round; then an alignment
round (5 alignment epochs) for each. Prints a small table."""
import dataclasses
import os
import time

import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

from fsl_fast.config import Config
from fsl_fast.runner import Run


DEVICE = os.environ.get("FSL_FAST_ROUND_DEVICE", "cuda")


def _sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run):
    _sync()
    t0 = time.perf_counter()
    run.step()
    _sync()
    return time.perf_counter() - t0


def main():
    rows = []
    cases = [("resnet18", "layer3", "synthetic:3x32x32"), ("cnn", "linear", "synthetic:1x28x28")]
    if os.environ.get("FSL_FAST_ROUND_QUICK"):
        cases = cases[1:]
    for model, aux, ds in cases:
        cfg = Config(algorithm="fsl_sage", model=model, aux=aux, dataset=ds, clients=10, batch_size=32,
                     schedule="parallel", device=DEVICE, align_interval=3, align_epochs=5).resolved()
        res = {}
        for fused in (False, True):
            run = Run(dataclasses.replace(cfg, fused=fused))
            run.step()  # round 0: warm-up (aligns)
            ordinary = min(timed(run), timed(run))
            align = timed(run)  # round 3 aligns
            res[fused] = (ordinary, align, run.metrics[-1]["test_accuracy"])
        rows.append((model, res))
    print("| model | engine | ordinary round (s) | alignment round (s) | acc |")
    print("|---|---|---|---|---|")
    for model, res in rows:
        for fused in (False, True):
            o, a, acc = res[fused]
            print(f"| {model} | {'fused' if fused else 'reference'} | {o:.3f} | {a:.3f} | {acc:.3f} |")
        print(f"| {model} | speedup | {res[False][0] / res[True][0]:.2f}x | {res[False][1] / res[True][1]:.2f}x | |")


if __name__ == "__main__":
    main()
