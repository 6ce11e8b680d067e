"""setup.py lists every subpackage (a non-editable install would silently drop a missing one)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_lists_every_subpackage():
    text = (ROOT / "setup.py").read_text()
    listed = set(re.findall(r'"(fsl_fast[\w.]*)"', text.split("packages=")[1].split("]")[0]))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fsl_fast").rglob("__init__.py")}
    found.add("fsl_fast.kernels")  # kernels/ is mapped into the package by package_dir
    assert found == listed
