"""The README's "A short tour" and "Comparing runs" commands, run as written through the CLI's
entry point (in a fresh folder, globs expanded as bash would, one epoch, two experiences,
16-px digits and a one-block ViT appended to every run), so the README cannot drift from the
code: a command the README shows must work, and compare must read what sweep wrote."""

from __future__ import annotations

import shlex
import glob
from pathlib import Path

from incremental.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
TINY = ("--set training.epochs=1 --set protocol.increment=5 --set dataset.image_size=16 --set output.tensorboard=false"
        " --set backbone.depth=1")


def section_commands(title: str, path: Path = README, prefix: str = "incremental ") -> list[str]:
    """The commands starting with ``prefix`` of the bash blocks under the heading ``title`` of
    ``path`` (the README by default; up to the next heading of any level), without their comments."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(title) + 1
    commands, in_block, fence = [], False, ""
    for line in lines[start:]:
        if line.startswith("```"):
            in_block, fence = not in_block, line
            continue
        if not in_block and line.startswith("#"):
            break  # the next heading
        command = line.split(" #", 1)[0].strip()
        if in_block and fence == "```bash" and command.startswith(prefix):
            commands.append(command)
    return commands


def as_written(command: str, cwd: Path) -> list[str]:
    """The command's arguments as bash would pass them (globs expanded in ``cwd``), with one
    epoch and two experiences appended to `run` and `sweep`."""
    words = []
    for word in shlex.split(command)[1:]:
        matches = sorted(glob.glob(word, root_dir=cwd)) if any(c in word for c in "*?[") else []
        words += matches or [word]
    return words + (shlex.split(TINY) if words[0] in ("run", "sweep") else [])


def test_the_readme_tour_and_comparison_run_as_written(tmp_path, monkeypatch, capsys):
    tour = section_commands("## A short tour")
    comparing = section_commands("### Comparing runs")
    assert any(c.startswith("incremental run ") for c in tour), tour
    assert [c.split()[1] for c in comparing] == ["sweep", "compare"], comparing
    monkeypatch.chdir(tmp_path)
    for command in tour + comparing:
        assert main(as_written(command, tmp_path)) == 0, command
    out = capsys.readouterr().out
    # the comparison read every run of the sweep (and skipped its own comparison folder)
    assert "strategy.name=replay" in out and "strategy.name=finetune" in out
    assert "(skipped runs/sweep/comparison: not a run directory" in out
    assert (tmp_path / "runs" / "comparison" / "report.md").is_file()


def example_table(text: str) -> list[str]:
    """The rows and the summary line of the first table block after "row per experience:", each
    without its wall-clock time."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "row per experience:" in line)
    block = lines[start:]
    opening = next(i for i, line in enumerate(block) if line.startswith("```"))
    closing = next(i for i, line in enumerate(block[opening + 1:], opening + 1) if line.startswith("```"))
    return [timeless(line) for line in block[opening + 1:closing] if line.strip()]


def timeless(line: str) -> str:
    import re

    if line.startswith("average incremental accuracy"):
        return re.sub(r", \d+s\)$", ")", line.strip())
    if line[:3].strip().isdigit():
        return line.rsplit(None, 1)[0]  # the last column is the time
    return line.rstrip()


def test_the_readme_example_table_is_what_this_version_prints():
    """`incremental run digits_b0_5steps` as shipped, in a fresh process with the 2 CPU threads of
    the machine the README names, gives the README's table: its first experience's progress line
    (the run is stopped by SIGTERM after it, to keep the suite short: the second row would cost
    another minute) carries the numbers of the table's row 0, so the README's example cannot drift
    from the code. Another thread count sums in another order and gives other numbers, which is
    why the README names it."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    expected = [line.split() for line in example_table(README.read_text(encoding="utf-8"))
                if line[:3].strip().isdigit()][:1]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    progress = []
    with tempfile.TemporaryDirectory() as folder:
        process = subprocess.Popen([sys.executable, "-m", "incremental", "run", "digits_b0_5steps", "--out",
                                    str(Path(folder) / "run"), "--set", "training.threads=2",
                                    "--set", "output.tensorboard=false"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            for line in process.stdout:
                if line.startswith("exp ") and " of 0-4 " in line:
                    progress.append(line.split())
                    if len(progress) == len(expected):
                        process.send_signal(signal.SIGTERM)
                        break
            process.wait(timeout=600)
        finally:
            process.kill()
    assert len(progress) == len(expected) == 1, progress
    for row, line in zip(expected, progress):
        # row: exp classes n acc avg old new forget bwt loss time; line: exp i of 0-4 acc A avg V old O new N forgetting F
        assert [line[i] for i in (5, 7, 9, 11, 13)] == row[3:8], (line, row)
