"""The wheel a user installs holds every package of the source tree, and works on its own."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_packages() -> set[str]:
    """Every folder with an __init__.py, named as it installs (strategies/ -> incremental.strategies)."""
    names = set()
    for init in ROOT.glob("**/__init__.py"):
        parts = init.parent.relative_to(ROOT).parts
        if parts[0] in ("strategies", "protocols"):
            names.add(".".join(("incremental", *parts)))
        elif parts[0] == "incremental":
            names.add(".".join(parts))
    return names


def test_the_wheel_holds_every_package_and_the_protocols(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("incremental_vit-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    packaged = {str(Path(f).parent).replace("/", ".") for f in files if f.endswith("/__init__.py")}
    assert source_packages() <= packaged, sorted(source_packages() - packaged)
    assert {"incremental.probes", "incremental.run", "incremental.config"} <= packaged
    shipped = {Path(f).name for f in files if f.startswith("incremental/protocols/")}
    assert {p.name for p in (ROOT / "protocols").glob("*.yaml")} <= shipped
    assert not any(f.startswith(("tests/", "experiments/")) for f in files)
