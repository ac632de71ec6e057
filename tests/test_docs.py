"""The documentation site builds with `mkdocs build --strict` (every link resolved, the API
reference rendered from the docstrings), its reference tables come from the registries, and the
commands it shares with the README are the README's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_readme import section_commands

ROOT = Path(__file__).resolve().parent.parent


def test_the_site_builds_strictly_with_every_registered_name(tmp_path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    from incremental.registry import REGISTRIES, load_builtins

    for kind in ("strategies", "backbones", "datasets", "probes"):
        load_builtins(kind)
        page = (site / "reference" / kind / "index.html").read_text()
        missing = [entry.name for entry in REGISTRIES[kind]  # the built-ins (tests register their own too)
                   if entry.module.startswith("incremental.") and f"<code>{entry.name}</code>" not in page]
        assert not missing, (kind, missing)
    assert "resolve_weights" in (site / "api" / "hub" / "index.html").read_text()  # from the docstrings


def test_the_docs_commands_are_the_readmes() -> None:
    readme = section_commands("### Comparing runs")
    docs = section_commands("# Comparing runs", ROOT / "docs" / "comparing.md")
    assert readme == docs and len(readme) == 2
    readme_setup = section_commands("## Set up and run", ROOT / "README.md", prefix="python -m pip")
    assert readme_setup and readme_setup == section_commands("## Install and run", ROOT / "docs" / "index.md",
                                                             prefix="python -m pip")
