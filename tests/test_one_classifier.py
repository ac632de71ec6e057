"""One classifier per run: the saved model, evaluated on its own, reproduces the last row of
the accuracy matrix for every shipped strategy; iCaRL's class means and BiC's bias layer travel
with the weights, and the probes see the same classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN, load_run_model

from incremental.cli import main
from incremental.models.net import classify
from incremental.protocol import OrderedClassSubset

STRATEGIES = {
    "finetune": "strategy: finetune",
    "replay": "strategy: replay",
    "vitil": "strategy: {name: vitil, balanced_finetuning: {epochs: 1}}",
    "icarl_ncm": "strategy: {name: icarl, classifier: ncm}",
    "icarl_cnn": "strategy: {name: icarl, classifier: cnn}",
    "lwf": "strategy: lwf",
    "ewc": "strategy: ewc",
    "bic": "strategy: {name: bic, stage_2_epochs: 2}",
    "der": "strategy: der",
    "gdumb": "strategy: gdumb",
}


def independent_accuracies(run_dir: Path) -> tuple[list[float], list[float], float]:
    """The saved model on each experience's test images, outside the template and plugins: the
    class-IL accuracies, the task-IL ones (the argmax over the experience's own classes) and the
    task-identification rate (how often the class-IL argmax falls in the right experience)."""
    cfg, splits, split, model, step = load_run_model(run_dir)
    test = OrderedClassSubset(splits.test, split.class_order)
    accuracies, task_il, right_task, images_seen = [], [], 0, 0
    with torch.no_grad():
        for labels in split.label_ranges()[: step + 1]:
            idx = [i for i, t in enumerate(test.targets) if t in labels]
            images = torch.stack([splits.eval_transform(test[i][0]) for i in idx])
            targets = torch.tensor([test.targets[i] for i in idx])
            logits = torch.cat([classify(model, images[k:k + 512]) for k in range(0, len(idx), 512)])
            predicted = logits.argmax(1)
            within = logits[:, labels.start:labels.stop].argmax(1) + labels.start
            accuracies.append(100.0 * int((predicted == targets).sum()) / len(idx))
            task_il.append(100.0 * int((within == targets).sum()) / len(idx))
            right_task += int(((predicted >= labels.start) & (predicted < labels.stop)).sum())
            images_seen += len(idx)
    return accuracies, task_il, 100.0 * right_task / images_seen


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_the_saved_model_reproduces_the_last_row(strategy, tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_RUN)
    config = tmp_path / "case.yaml"
    config.write_text(f"extends: tiny.yaml\n{STRATEGIES[strategy]}\n")
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--set", "training.epochs=2",
                 "--set", "output.tensorboard=false"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    accuracies, task_il, task_identification = independent_accuracies(out)
    assert accuracies == metrics["accuracy_matrix"][-1]
    assert task_il == metrics["task_il_accuracy_matrix"][-1]
    assert task_identification == pytest.approx(metrics["task_identification"][-1], abs=1e-9)


def test_icarl_saves_its_class_means_and_probes_classify_with_them(tmp_path):
    """The NCM means are in model.safetensors; the in-run probe's clean accuracy is the NCM's."""
    from safetensors.torch import load_file

    (tmp_path / "tiny.yaml").write_text(TINY_RUN)
    config = tmp_path / "icarl.yaml"
    config.write_text("extends: tiny.yaml\nstrategy: {name: icarl, classifier: ncm}\n"
                      "probes: [{name: masking, num_samples: 10000, fractions: [0.05], patch_drop: false}]\n")
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--set", "training.epochs=1",
                 "--set", "output.tensorboard=false"]) == 0
    saved = load_file(str(out / "model.safetensors"))
    assert saved["output_adapter.means"].shape == (10, 32)
    metrics = json.loads((out / "metrics.json").read_text())
    probe = metrics["probes"]["masking"][-1]
    # the probe's clean accuracy on all seen test images is the run's last accuracy, NCM's
    assert probe["summary"]["clean_accuracy"] == pytest.approx(metrics["accuracy"][-1], abs=1e-4)  # float32 mean
