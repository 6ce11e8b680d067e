"""Settings every benchmark file shares.

``FSL_FAST_BENCH_QUICK=1`` selects the quick mode: smaller shapes, fewer clients and fewer timed
rounds, but the same code paths and the same correctness checks before timing. It exists so that
CI can run the whole benchmark suite in a few minutes and notice when a benchmark breaks or when
the suite silently collects nothing; its numbers are smoke numbers, not the ones quoted in the
README. A benchmark added later picks its sizes through :func:`pick` so it honours the mode too.
"""
from __future__ import annotations

import os

QUICK = os.environ.get("FSL_FAST_BENCH_QUICK", "").strip().lower() not in ("", "0", "false", "no")


def pick(full, quick):
    """``quick`` in the quick mode, ``full`` otherwise."""
    return quick if QUICK else full
