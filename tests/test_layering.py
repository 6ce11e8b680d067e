"""The layers' import rules, read from the source (ast): the algorithms and engines talk to the
channel interface only, the transport knows engines only through their interface, and no module
reaches into another package's private names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The compiled extension (either build) is the ops package's implementation, loaded by name from
# fsl_fast.ops.
EXEMPT = {"fsl_fast._C", "fsl_fast._C_avx512"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).parent.parts) if path.is_relative_to(ROOT) else ""


def _sources(*dirs):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def _imports(path: Path):
    """(line, module, name or None, alias) of every import in the file (inside functions too),
    relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = _package(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None, a.asname
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            for a in node.names:
                yield node.lineno, mod, a.name, a.asname


def _targets(mod: str, name: str | None) -> list[str]:
    """Modules an import may refer to: ``from a.b import c`` is a.b, or the submodule a.b.c."""
    return [mod] if name is None else [mod, f"{mod}.{name}"]


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _owner_package(mod: str) -> str:
    """The package a module belongs to (fsl_fast.ops for fsl_fast.ops.quantize and fsl_fast.ops)."""
    p = (ROOT / Path(*mod.split("."))).with_suffix("")
    return mod if p.is_dir() else mod.rsplit(".", 1)[0]


def test_algorithms_and_engines_see_only_the_channel_interface():
    bad = []
    files = [ROOT / "fsl_fast" / "algorithms.py", *_sources("fsl_fast/engines")]
    for f in files:
        for line, mod, name, _ in _imports(f):
            for t in _targets(mod, name):
                interface = t == "fsl_fast.transport.base" or t.startswith("fsl_fast.transport.base.")
                if (t.startswith("fsl_fast.transport.") and not interface) or t.startswith("fsl_fast.distributed"):
                    bad.append(f"{f.relative_to(ROOT)}:{line} imports {t}")
    assert not bad, "\n".join(bad)


def test_transport_sees_engines_only_through_their_interface():
    bad = []
    for f in _sources("fsl_fast/transport"):
        for line, mod, name, _ in _imports(f):
            for t in _targets(mod, name):
                engine_other = t.startswith("fsl_fast.engines") and not t.startswith("fsl_fast.engines.base")
                if engine_other or t.startswith(("fsl_fast.distributed", "fsl_fast.runner", "fsl_fast.algorithms")):
                    bad.append(f"{f.relative_to(ROOT)}:{line} imports {t}")
    assert not bad, "\n".join(bad)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _private_uses(path: Path):
    """Private names of fsl_fast modules outside the importer's package: imported by name, as a
    module path, or read as an attribute of an imported module."""
    own = _package(path) if path.is_relative_to(ROOT / "fsl_fast") else None
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, str] = {}
    for line, mod, name, asname in _imports(path):
        if not mod.startswith("fsl_fast"):
            continue
        full = mod if name is None else f"{mod}.{name}"
        if full in EXEMPT or mod in EXEMPT:
            continue
        parts = full.split(".")
        for i, part in enumerate(parts):
            if _is_private(part):
                owner = _owner_package(".".join(parts[:i]))
                if owner != own:
                    yield f"{_shown(path)}:{line} imports {'.'.join(parts[: i + 1])}"
                break
        if name is None:
            aliases[asname or mod.split(".")[0]] = mod if asname else mod.split(".")[0]
        elif name != "*":
            aliases[asname or name] = full
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _is_private(node.attr):
            mod = aliases.get(node.value.id)
            if mod is None or not (ROOT / Path(*mod.split("."))).with_suffix(".py").exists() \
                    and not (ROOT / Path(*mod.split("."))).is_dir():
                continue  # not a module of ours (a class, a function, a value)
            if _owner_package(mod) != own and mod + "." + node.attr not in EXEMPT:
                yield f"{_shown(path)}:{node.lineno} reads {mod}.{node.attr}"


@pytest.mark.parametrize("tree", ["fsl_fast", "bench", "tools"])
def test_no_private_names_of_another_package(tree):
    bad = [u for f in _sources(tree) for u in _private_uses(f)]
    assert not bad, "\n".join(bad)


def test_the_private_name_check_catches_both_forms(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from fsl_fast.ops import quantize as Q\nfrom fsl_fast.ops import _backend\n"
                     "x = Q._hidden\n")
    found = list(_private_uses(probe))
    assert any("imports fsl_fast.ops._backend" in u for u in found), found
    assert any("reads fsl_fast.ops.quantize._hidden" in u for u in found), found
