"""Shared helpers. Tests run the real torch, timm, Avalanche and TensorBoard code on small
data that the tests write themselves (or scikit-learn's bundled digits)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

# No test reaches the Hugging Face Hub or reads the user's cache: names resolve from caches the
# tests lay out (test_hub.py). huggingface_hub reads both when it is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="incremental-tests-hf-")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the machine's cores: one thread each (and in the processes the
    # tests start), since oversubscribed OpenMP threads spin and slow everything down.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)

# The files whose tests take longest, slowest first (experiments/bench/test_suite.md), are
# collected first: xdist's loadfile hands whole files to the workers in collection order, and a
# slow file handed out last keeps one worker busy while the other has nothing left to do.
SLOW_FILES_FIRST = ("test_readme.py", "test_resume.py", "test_distributed.py", "test_compare.py",
                    "test_pretrained_methods.py", "test_clip.py", "test_backbones.py", "test_run_directory.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


# A protocol small enough to train in seconds: 16 px digits, a one-block ViT, 3 experiences.
TINY_RUN = """
name: tiny
seed: 3
dataset: {name: digits, image_size: 16}
protocol:
  initial_classes: 4
  increment: 3
  class_order: random
  memory: {total: 30}
backbone: {name: vit, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2, global_pool: avg, drop_path_rate: 0.0}
strategy: {name: replay}
training:
  epochs: 6               # a ViT from scratch needs ~100 steps before it leaves chance level
  batch_size: 16
  eval_batch_size: 512
  optimizer: {name: adamw, lr: 3.0e-3}
"""


def run_tiny(tmp_path: Path, name: str, *sets: str) -> dict:
    """``incremental run`` of TINY_RUN (in this process) into ``tmp_path/name`` with ``--set``
    values and no TensorBoard; returns its metrics.json."""
    import json

    from incremental.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    args = ["run", str(config), "--out", str(tmp_path / name), "--quiet", "--set", "output.tensorboard=false"]
    for value in sets:
        args += ["--set", value]
    assert main(args) == 0
    return json.loads((tmp_path / name / "metrics.json").read_text())


def incremental_process(*args: str, env: dict | None = None, processes: int = 1) -> subprocess.CompletedProcess:
    """``python -m incremental ARGS`` in a fresh interpreter (under torchrun with ``processes`` > 1)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "incremental", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def rewind_checkpoint(run_dir: Path, experience: int) -> None:
    """Make a run's checkpoint say it stopped after ``experience`` (results cut to match; the
    weights stay those of the last experience, which only matters for comparisons)."""
    import json

    import torch

    path = run_dir / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    results = json.loads(state["results"])
    state["results"] = json.dumps({k: v[: experience + 1] for k, v in results.items()})
    state["experience"] = experience
    torch.save(state, path)


def in_fork(work: Callable[[], int], *, env: dict | None = None, wait: bool = True, stdout: Path | None = None,
            stderr: Path | None = None, cwd: Path | None = None) -> int:
    """``work()`` in a forked copy of this test process: a separate process (it can be
    SIGKILLed, and its locks are its own) without an interpreter's 10 s of imports. Returns
    the exit status as subprocess does (-9 for SIGKILL), or with ``wait=False`` the child's
    PID (see :func:`wait_for_fork`). One thread, in the parent's place too when results are
    compared: OpenMP's thread pool does not survive a fork, and the thread count can change
    the last bit of a float. ``stdout``/``stderr``: files that get the child's output
    (pytest's capture would swallow it); ``cwd``: where the child runs."""
    import torch

    _import_what_a_run_imports()  # once here, instead of in every child
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            for fd, path in ((1, stdout), (2, stderr)):
                if path is not None:
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            if stdout is not None:
                sys.stdout = open(1, "w", closefd=False)
            if stderr is not None:
                sys.stderr = open(2, "w", closefd=False)
            if cwd is not None:
                os.chdir(cwd)
            torch.set_num_threads(1)
            os.environ.update(env or {})
            code = work()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - shown in the child's stderr, the status says it failed
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return wait_for_fork(pid) if wait else pid


def main_in_fork(*args: str, quiet: bool = True, **fork: Any) -> int:
    """``incremental ARGS`` in a forked copy of this test process (see :func:`in_fork`, which
    takes the keyword arguments)."""
    def work() -> int:
        from incremental.cli import main

        return main([*args, *(["--quiet"] if quiet else [])])

    return in_fork(work, **fork)


def script_in_fork(script: Path, *args: str, **fork: Any) -> int:
    """``python SCRIPT ARGS`` in a forked copy of this test process (see :func:`in_fork`): the
    script runs as ``__main__`` with its folder first on ``sys.path``, as the interpreter would
    run it, without a fresh interpreter's imports."""
    def work() -> int:
        import runpy

        sys.argv = [str(script), *args]
        sys.path.insert(0, str(script.parent))
        runpy.run_path(str(script), run_name="__main__")
        return 0

    return in_fork(work, **fork)


def ranks_in_fork(*args: str, processes: int = 2, stderr_dir: Path) -> tuple[int, str]:
    """``incremental ARGS`` on ``processes`` data-parallel ranks, each a forked copy of this
    process (see :func:`main_in_fork`) given the environment torchrun gives its workers, so
    the toolkit joins the process group exactly as under torchrun, minus an interpreter's
    imports per rank. Returns the worst exit status and rank 0's standard error."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pids = []
    for rank in range(processes):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
               "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        pids.append(main_in_fork(*args, env=env, wait=False, quiet=False, stderr=stderr_dir / f"rank{rank}.err"))
    codes = [wait_for_fork(pid) for pid in pids]
    return max(codes, key=abs), (stderr_dir / "rank0.err").read_text()


def _import_what_a_run_imports() -> None:
    import importlib

    from incremental.registry import load_builtins

    load_builtins()
    for module in ("incremental.run.loop", "incremental.training.template", "incremental.training.plugins", "incremental.protocol",
                   "incremental.tensorboard", "torch.utils.tensorboard", "sklearn.datasets",
                   "sklearn.model_selection", "avalanche.training.templates", "avalanche.benchmarks.scenarios",
                   "safetensors.torch", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        importlib.import_module(module)


def wait_for_fork(pid: int) -> int:
    """The exit status of a child started by ``main_in_fork(..., wait=False)``."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


@pytest.fixture
def one_thread():
    """This process on one thread, like main_in_fork's children, for bit-exact comparisons."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def write_yaml(tmp_path: Path):
    def write(text: str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def tiny_config(write_yaml) -> Path:
    return write_yaml(TINY_RUN, "tiny.yaml")


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """The cifar-100-python layout: pickles with bytes keys, as the official archive has."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                 b"fine_labels": [i % 100 for i in range(n)], b"coarse_labels": [i % 20 for i in range(n)],
                 b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}
    with (folder / "meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def write_image_folder(root: Path, classes=("n01", "n02", "n03"), per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                ext = ".JPEG" if i % 2 else ".png"
                Image.fromarray(pixels).save(d / f"img{i}{ext}")
    return root


def load_run_model(run_dir: Path):
    """A finished run's config, dataset splits, class split, and its saved model in eval mode
    with the experience it was saved after (the way `incremental probe` loads it)."""
    from incremental.config import load_config
    from incremental.data import build_dataset
    from incremental.probes.offline import load_saved_model
    from incremental.protocol import make_class_split

    cfg, _ = load_config(str(run_dir / "config.yaml"))
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
    model, step = load_saved_model(run_dir, cfg, splits, split)
    model.eval()
    return cfg, splits, split, model, step


def comparable(run_dir: Path) -> dict:
    """A run's metrics.json without its wall-clock times, the only values a resumed run cannot
    reproduce."""
    import json

    from incremental.run import without_wall_clock

    return without_wall_clock(json.loads((run_dir / "metrics.json").read_text()))


def resume_from_first_checkpoint(full: Path, stopped: Path) -> None:
    """Stop ``full`` after experience 0 in effect: its config and archived first checkpoint copied
    into ``stopped``, then ``incremental run --resume`` there."""
    import shutil

    from incremental.cli import main
    from incremental.run.directory import CHECKPOINT_FILE

    stopped.mkdir()
    shutil.copy(full / "config.yaml", stopped / "config.yaml")
    shutil.copy(full / "checkpoints" / "experience_000.pt", stopped / CHECKPOINT_FILE)
    assert main(["run", "--resume", str(stopped), "--quiet"]) == 0


def same_weights(a: Path, b: Path) -> bool:
    """Whether two runs saved bit-identical models."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
