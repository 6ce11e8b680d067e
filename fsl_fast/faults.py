"""Faults that end a run: divergence (non-finite numbers), run-directory I/O errors, formats.

Exit statuses of ``python -m fsl_fast.train`` (README, "Exit statuses"):

- 0: finished; 2: bad option value, unreadable input, unwritable ``--out`` at start, or a
  checkpoint/config of a format this fsl_fast does not read;
- 3: :class:`Divergence`: a non-finite loss, activation, gradient or model parameter; the run stops
  at the end of the phase where it appeared and the last completed round's checkpoint is intact;
- 4: :class:`RunIOError`: writing the run directory failed during the run; the checkpoint and
  metrics.jsonl on disk are those of the last completed round (or one round apart, see
  ``runner.train``), and ``--resume`` continues from the checkpoint.
"""
from __future__ import annotations

import errno
import json
import math
import os
import time

import torch

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_IO = 4

# Format version of checkpoints/last.pt, the distributed shards and config.json. Files written
# before formats were versioned carry none; their layout is that of version 1, so they read as it.
FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)


class Divergence(RuntimeError):
    """A non-finite number in training. ``str()`` is the one-line message the CLI prints."""

    def __init__(self, round_: int, client: int | None, phase: str, what: str, kind: str):
        self.round, self.client, self.phase, self.what, self.kind = round_, client, phase, what, kind
        who = f"round {round_}, " + (f"client {client}, " if client is not None else "")
        verb = "are" if what.endswith("parameters") else "is"
        super().__init__(f"{who}{phase}: {what} {verb} {kind}")


class RunIOError(RuntimeError):
    """Writing ``path`` failed (full disk, read-only folder, removed directory...)."""

    def __init__(self, path, cause: OSError):
        self.path, self.cause = str(path), cause
        reason = cause.strerror or str(cause)
        code = errno.errorcode.get(cause.errno, "") if cause.errno else ""
        super().__init__(f"cannot write {path}: {reason}" + (f" ({code})" if code else ""))


# -- non-finite checks -------------------------------------------------------------------------

def _kind(t: torch.Tensor) -> str | None:
    """"NaN", "Inf" or None (all finite), exactly."""
    if bool(torch.isfinite(t).all()):
        return None
    return "NaN" if bool(torch.isnan(t).any()) else "Inf"


class FiniteGuard:
    """Checks the tensors a phase produced, once, at the phase's end.

    Each queued group of tensors is reduced to one float sum when it is queued (one reduction
    and one host read per group). A sum of finite numbers is finite unless it overflows, so a
    finite sum settles the common case; only when a sum is not finite are that group's tensors
    checked element by element (which also rules out an overflowing sum of finite values).
    Groups are searched in the order they were queued, clients in order within a group: the
    first non-finite tensor names the client.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.round = 0
        self.seconds = 0.0  # time spent queueing and verifying (metrics: seconds_checks)
        self._groups: list = []  # (what, [(client, [tensors])], total)

    def add(self, client: int | None, what: str, tensors) -> None:
        """Queue one client's tensor or list of tensors (one model's parameters)."""
        if not self.enabled or tensors is None:
            return
        t0 = time.perf_counter()
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        tensors = [t for t in tensors if t is not None and t.numel()]
        if tensors:
            with torch.no_grad():
                s = tensors[0].sum() if len(tensors) == 1 else torch.stack([t.sum() for t in tensors]).sum()
                self._groups.append((what, [(client, tensors)], float(s)))
        self.seconds += time.perf_counter() - t0

    def add_many(self, what: str, clients, tensors, batched=None) -> None:
        """Queue one tensor per client. Equal-sized rows of one contiguous tensor (the fused
        engine's batched outputs, rows of a [K, P] buffer) are reduced by a single sum;
        ``batched``: that tensor when the caller knows it."""
        if not self.enabled or not tensors:
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            rows = batched if batched is not None else _as_rows(tensors)
            if rows is not None:
                total = float(rows.sum())
            else:
                sums = [t.sum() for t in tensors if t.numel()]
                total = float(torch.stack(sums).sum()) if sums else 0.0
        self._groups.append((what, [(k, [t]) for k, t in zip(clients, tensors)], total))
        self.seconds += time.perf_counter() - t0

    def verify(self, phase: str) -> None:
        """Raise :class:`Divergence` for the first non-finite tensor queued since the last call."""
        groups, self._groups = self._groups, []
        if all(math.isfinite(g[2]) for g in groups):
            return
        for what, members, total in groups:
            if math.isfinite(total):
                continue
            for client, tensors in members:
                for t in tensors:
                    kind = _kind(t)
                    if kind is not None:
                        raise Divergence(self.round, client, phase, what, kind)

    def discard(self) -> None:
        self._groups = []


def _as_rows(tensors):
    """A [n, m] view covering ``tensors`` when they are consecutive equal-sized contiguous pieces
    of one tensor (e.g. ``x.unbind(0)``), else None."""
    t0 = tensors[0]
    base = t0._base
    if base is None or not base.is_contiguous() or not t0.is_contiguous():
        return None
    m, es, p0 = t0.numel(), t0.element_size(), t0.data_ptr()
    for i, t in enumerate(tensors):
        if t._base is not base or t.numel() != m or t.data_ptr() != p0 + i * m * es or not t.is_contiguous():
            return None
    start = (p0 - base.data_ptr()) // es
    return base.reshape(-1)[start:start + len(tensors) * m].view(len(tensors), m)


def check_value(round_: int, phase: str, what: str, value: float, client: int | None = None) -> None:
    """Raise :class:`Divergence` if the Python number ``value`` is not finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise Divergence(round_, client, phase, what, "NaN" if math.isnan(value) else "Inf")


# -- strict JSON -------------------------------------------------------------------------------

def json_safe(obj):
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    """Strict JSON: non-finite floats become null; ``allow_nan=False`` guards the rest."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


# -- run-directory writes ----------------------------------------------------------------------

class _RecordingFile:
    """A binary file whose write errors are kept: torch.save reports a failed write as a generic
    RuntimeError ("unexpected pos ..."), and the OSError with the real cause is what we report."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def _cleanup(tmp) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def _atomic(path, write) -> None:
    """``write(tmp)`` then rename over ``path``: ``path`` is the old or the new file, never a
    partial one. Raises :class:`RunIOError` naming ``path`` and the cause."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _cleanup(tmp)
        raise RunIOError(path, e) from None


def _torch_save_to(obj, tmp) -> None:
    with open(tmp, "wb") as raw:
        f = _RecordingFile(raw)
        try:
            torch.save(obj, f)
        except RuntimeError:
            if f.error is not None:
                raise f.error from None
            raise


def atomic_torch_save(obj, path) -> None:
    """torch.save through a temporary file and a rename (RunIOError on failure)."""
    _atomic(path, lambda tmp: _torch_save_to(obj, tmp))


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (RunIOError on failure)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def append_line(path, line: str) -> None:
    """Append one line; on failure the file is cut back to its old length (no partial line)."""
    path = os.fspath(path)
    try:
        with open(path, "a") as f:
            start = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError:
                try:
                    f.truncate(start)
                except OSError:
                    pass
                raise
    except OSError as e:
        raise RunIOError(path, e) from None


def check_version(what: str, found, where) -> None:
    """``found``: the version stored in a file (None when unversioned). Raises ConfigError (exit 2)
    for a version this fsl_fast does not read."""
    from fsl_fast.config import ConfigError

    if found is None:
        return  # written before versioning: version 1's layout
    if not isinstance(found, int) or isinstance(found, bool) or found not in READABLE_VERSIONS:
        newer = isinstance(found, int) and found > FORMAT_VERSION
        raise ConfigError(f"--resume: {where} is a {what} of format version {found!r}"
                          f"{' (written by a newer fsl_fast)' if newer else ''}; this fsl_fast reads "
                          f"version{'s' if len(READABLE_VERSIONS) > 1 else ''} "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
