"""An interpreter that sees this environment's packages less the optional extras: what a user
has after the README's base install (``pip install incremental-vit``), without reinstalling torch.

The environment's site-packages entries are linked into one folder, leaving out the extras'
packages; a fresh venv adds that folder as a site directory, so its ``.pth`` files (an editable
install's finder among them) still run. Used by the tests and by .ci/run's wheel check:
``python tests/base_install.py DEST [--no-project]`` prints the new interpreter's path."""

from __future__ import annotations

import argparse
import site
import subprocess
import sys
from pathlib import Path

# the import names and distribution folders of setup.cfg's extras, and of torchattacks (installed apart)
# (wandb is not among them: avalanche-lib depends on it and imports it, so every install has it)
EXTRA_PREFIXES = ("open_clip", "torch_pruning", "torchattacks", "imagecorruptions", "mlflow", "submitit")
PROJECT_PREFIXES = ("incremental_vit", "__editable__.incremental_vit", "__editable___incremental_vit")


def base_install(dest: Path, *, with_project: bool = True) -> Path:
    """A venv under ``dest`` whose packages are this environment's without the extras (and without
    this project, if ``with_project`` is false, for installing a wheel into it); its python."""
    linked = dest / "site"
    linked.mkdir(parents=True, exist_ok=True)
    left_out = EXTRA_PREFIXES + (() if with_project else PROJECT_PREFIXES)
    for directory in site.getsitepackages():
        for entry in Path(directory).iterdir():
            if entry.name.startswith(left_out) or entry.name == "__pycache__" or (linked / entry.name).exists():
                continue
            (linked / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest / "venv")], check=True)
    python = dest / "venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "base_install.pth").write_text(f"import site; site.addsitedir({str(linked)!r})\n")
    return python


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--no-project", action="store_true", help="leave this project out too (to install its wheel)")
    arguments = parser.parse_args()
    print(base_install(arguments.dest, with_project=not arguments.no_project))
