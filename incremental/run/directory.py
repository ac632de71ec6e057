"""What a run directory holds, and the helpers that write it."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import UserError

MODEL_FILE = "model.safetensors"  # the model after the last completed experience
RESUME_LOG = "resume.log"


def default_run_dir(cfg: RunConfig, suffix: str = "") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.root) / f"{cfg.name}{suffix}-{stamp}"


def prepare_run_dir(run_dir: Path, marker: str = "metrics.json") -> None:
    """Create the run directory; refuse one that already holds a run's results (``marker``)."""
    if (run_dir / marker).exists():
        raise UserError(f"{run_dir} already holds a run ({marker}); choose another --out", key="--out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to {run_dir}: {exc.strerror or exc}", key="--out") from None


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers (and a resumed run) never see a half-written file


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_model(model: Any, path: Path, *, experience: int) -> None:
    """The model's state dict as safetensors (no pickle), replaced atomically, with the
    experience it was trained up to and its class count in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"experience": str(experience), "num_classes": str(model.num_classes),
                                         "format": "incremental-vit model"})
    os.replace(tmp, path)
