"""The bad-input table: every malformed input ends the command with exit code 2 and one line
that names the file (or flag) and the key, with no traceback; work already done is kept.

Each case runs the real `incremental run` entry point in this process (an exception that
escaped would fail the test); the last test runs a few through a fresh interpreter to see
exactly what a user sees on stderr.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_RUN, rewind_checkpoint, write_cifar100, write_image_folder

from incremental.run.directory import CHECKPOINT_FILE
from incremental.cli import main


class Workspace:
    """A folder with tiny.yaml, configs extending it, and one finished 3-experience run."""

    def __init__(self, root: Path, finished: Path):
        self.root = root
        self.finished = finished
        (root / "tiny.yaml").write_text(TINY_RUN)

    def config(self, body: str, name: str = "case") -> str:
        path = self.root / f"{name}.yaml"
        path.write_text("extends: tiny.yaml\n" + body)
        return str(path)

    def run_copy(self) -> Path:
        """A copy of the finished run, made to look stopped after experience 0."""
        copy = self.root / "stopped"
        shutil.copytree(self.finished, copy)
        rewind_checkpoint(copy, 0)
        return copy


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    (root / "tiny.yaml").write_text(TINY_RUN)
    out = root / "run"
    assert main(["run", str(root / "tiny.yaml"), "--out", str(out), "--quiet", "--set", "training.epochs=1",
                 "--set", "output.tensorboard=false"]) == 0
    return out


def _typo_in_parent(ws: Workspace) -> list[str]:
    (ws.root / "tiny.yaml").write_text(TINY_RUN + "probes: [{name: masking, samples: 3}]\n")
    return ["run", ws.config("seed: 1\n")]


def _cifar_with_corrupt_train(ws: Workspace) -> str:
    folder = write_cifar100(ws.root / "cifar")
    (folder / "train").write_bytes(b"not a pickle")
    return ws.config(f"dataset: {{name: cifar100, root: {ws.root / 'cifar'}}}\n")


def _cifar_download_with_a_bad_checksum(ws: Workspace) -> str:
    import tarfile

    source = write_cifar100(ws.root / "source", n_train=20, n_test=10)
    archive = ws.root / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-100-python")
    return ws.config(f"dataset: {{name: cifar100, root: {ws.root / 'data'}, download: true, "
                     f"url: '{archive.as_uri()}', md5: '{'0' * 32}'}}\n")


def _empty_image_folder(ws: Workspace) -> str:
    for split in ("train", "val"):
        (ws.root / "images" / split).mkdir(parents=True)
    return ws.config(f"dataset: {{name: imagefolder, root: {ws.root / 'images'}}}\n")


def _unreadable_training_image(ws: Workspace) -> list[str]:
    root = write_image_folder(ws.root / "imgs", classes=("a", "b"), per_class=2)
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    return ["run", ws.config(f"dataset: {{name: imagefolder, root: {root}, image_size: 16}}\n"
                             "protocol: {initial_classes: 0, increment: 1, class_order: sorted, memory: {total: 2}}\n"
                             "training: {epochs: 1}\n")]


def _other_architecture_weights(ws: Workspace) -> str:
    path = ws.root / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3)}, str(path))
    return ws.config(f"backbone: {{pretrained: {path}}}\n")


def _truncated_checkpoint(ws: Workspace) -> list[str]:
    run = ws.run_copy()
    data = (run / CHECKPOINT_FILE).read_bytes()
    (run / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    return ["run", "--resume", str(run)]


def _foreign_checkpoint(ws: Workspace) -> list[str]:
    run = ws.run_copy()
    torch.save({"model": {}}, run / CHECKPOINT_FILE)
    return ["run", "--resume", str(run)]


def _edited_run_config(ws: Workspace) -> list[str]:
    run = ws.run_copy()
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("epochs: 1", "epochs: 2", 1))
    return ["run", "--resume", str(run)]


# (case, argv builder, expected start of the line (file or flag), expected text with the key)
CASES: list[tuple[str, Callable[[Workspace], list[str]], Callable[[Workspace], str], str]] = [
    ("yaml syntax", lambda ws: ["run", ws.config("training: {epochs: 2\n")],
     lambda ws: str(ws.root / "case.yaml"), "invalid YAML"),
    ("key written twice", lambda ws: ["run", ws.config("seed: 1\nseed: 2\n")],
     lambda ws: str(ws.root / "case.yaml"), "key 'seed' is written twice"),
    ("unknown top-level key", lambda ws: ["run", ws.config("trainig: {epochs: 1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "trainig: unknown key (did you mean 'training'?)"),
    ("unknown nested key", lambda ws: ["run", ws.config("training: {optimizer: {lrr: 1}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "training.optimizer.lrr: unknown key"),
    ("unknown strategy option", lambda ws: ["run", ws.config("strategy: {name: replay, selektion: random}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.selektion: unknown key"),
    ("unknown key in the parent file", _typo_in_parent,
     lambda ws: str(ws.root / "tiny.yaml"), "probes.0.samples: unknown key"),
    ("wrong type", lambda ws: ["run", ws.config("training: {epochs: ten}\n")],
     lambda ws: str(ws.root / "case.yaml"), "training.epochs: expected an integer, got 'ten'"),
    ("zero epochs", lambda ws: ["run", ws.config("training: {epochs: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "training.epochs: must be >= 1, got 0"),
    ("negative increment", lambda ws: ["run", ws.config("protocol: {increment: -3}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.increment: must be >= 1, got -3"),
    ("increments that do not add up", lambda ws: ["run", ws.config("protocol: {initial_classes: 0, increment: [4, 4]}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.increment: increments add up to 8"),
    ("class order with a duplicate", lambda ws: ["run", ws.config("protocol: {class_order: [0,1,2,3,4,5,6,7,8,8]}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.class_order: classes listed more than once: [8]"),
    ("class order with an unknown class", lambda ws: ["run", ws.config("protocol: {class_order: [0,1,2,3,4,5,6,7,8,12]}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.class_order: classes [12] do not exist"),
    ("missing dataset folder", lambda ws: ["run", ws.config(f"dataset: {{name: cifar100, root: {ws.root / 'none'}}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "dataset.root: " ),
    ("empty dataset folder", lambda ws: ["run", _empty_image_folder(ws)],
     lambda ws: str(ws.root / "case.yaml"), "dataset.root: " ),
    ("corrupt dataset file", lambda ws: ["run", _cifar_with_corrupt_train(ws)],
     lambda ws: str(ws.root / "case.yaml"), "is not a CIFAR-100 pickle"),
    ("unreadable training image", _unreadable_training_image,
     lambda ws: str(ws.root / "case.yaml"), "dataset.root: cannot read image "),
    ("unknown backbone", lambda ws: ["run", ws.config("backbone: {name: vitt}\n")],
     lambda ws: str(ws.root / "case.yaml"), "backbone.name: unknown backbone 'vitt' (did you mean 'vit'?)"),
    ("unknown strategy", lambda ws: ["run", ws.config("strategy: replai\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.name: unknown strategy 'replai' (did you mean 'replay' or 'gan_replay'?)"),
    ("unknown probe", lambda ws: ["run", ws.config("probes: [masks]\n")],
     lambda ws: str(ws.root / "case.yaml"), "probes.0.name: unknown probe 'masks' (did you mean 'masking'?)"),
    ("missing pretrained file", lambda ws: ["run", ws.config(f"backbone: {{pretrained: {ws.root / 'none.pt'}}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "backbone.pretrained: pretrained weights"),
    ("pretrained file of another architecture", lambda ws: ["run", _other_architecture_weights(ws)],
     lambda ws: str(ws.root / "case.yaml"), "backbone.pretrained: " ),
    ("unknown timm weights tag", lambda ws: ["run", ws.config(
        "backbone: {name: timm_vit, model: test_vit, pretrained: timm/test_vit.r16_in1k}\n")],
     lambda ws: str(ws.root / "case.yaml"), "backbone.pretrained: unknown timm weights 'timm/test_vit.r16_in1k' "
                                            "(did you mean 'test_vit.r160_in1k'?)"),
    ("unknown open_clip weights tag", lambda ws: ["run", ws.config(
        "backbone: {name: clip, model: ViT-B-32, pretrained: laion400m_e3}\n")],
     lambda ws: str(ws.root / "case.yaml"), "backbone.pretrained: unknown open_clip weights 'laion400m_e3' for ViT-B-32"),
    ("named weights missing from the offline cache", lambda ws: ["run", ws.config(
        "backbone: {name: timm_vit, model: test_vit, pretrained: timm/test_vit.r160_in1k}\n")],
     lambda ws: str(ws.root / "case.yaml"), "fetch it with: hf download timm/test_vit.r160_in1k"),
    ("a timm name without a tag", lambda ws: ["run", ws.config("backbone: {pretrained: timm/vit_tiny}\n")],
     lambda ws: str(ws.root / "case.yaml"), "backbone.pretrained: 'timm/vit_tiny' names no weights"),
    ("pretrained_tag beside a name", lambda ws: ["run", ws.config(
        "backbone: {name: timm_vit, model: test_vit, pretrained: 'hf-hub:org/none', pretrained_tag: x}\n")],
     lambda ws: str(ws.root / "case.yaml"), "backbone.pretrained_tag: pretrained_tag describes a local weights file"),
    ("a download whose checksum differs", lambda ws: ["run", _cifar_download_with_a_bad_checksum(ws)],
     lambda ws: str(ws.root / "case.yaml"), "dataset.md5: file://"),
    ("a download url that is not one", lambda ws: ["run", ws.config("dataset: {name: cifar100, root: x, url: data.tgz}\n")],
     lambda ws: str(ws.root / "case.yaml"), "dataset.url: 'data.tgz' is not a URL"),
    ("an md5 that is not one", lambda ws: ["run", ws.config("dataset: {name: cifar100, root: x, md5: abc}\n")],
     lambda ws: str(ws.root / "case.yaml"), "dataset.md5: 'abc' is not an md5"),
    ("a named dataset's missing folder", lambda ws: ["run", ws.config(f"dataset: {{name: cub200, root: {ws.root / 'cub'}}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "is published at https://www.vision.caltech.edu/datasets/cub_200_2011/"),
    ("unknown logger", lambda ws: ["run", ws.config("output: {loggers: [tensorboard, wandbb]}\n")],
     lambda ws: str(ws.root / "case.yaml"), "output.loggers.1: "),
    ("a logger listed twice", lambda ws: ["run", ws.config("output: {loggers: [csv, csv]}\n")],
     lambda ws: str(ws.root / "case.yaml"), "output.loggers.1: 'csv' is listed twice"),
    ("an empty tracker project", lambda ws: ["run", ws.config("output: {project: ''}\n")],
     lambda ws: str(ws.root / "case.yaml"), "output.project: 0 characters; a name of 1 to 128"),
    ("a tracker that cannot start", lambda ws: ["run", ws.config("output: {loggers: [mlflow]}\n"),
                                                "--set", "output.project=tests"],
     lambda ws: str(ws.root / "case.yaml"), "output.loggers.0: mlflow could not start: "),
    ("output directory that cannot be written", lambda ws: ["run", ws.config(""), "--out",
                                                            str(ws.config("", "a_file")) + "/run"],
     lambda ws: "--out", "cannot write to"),
    ("an existing run as --out", lambda ws: ["run", ws.config(""), "--out", str(ws.finished)],
     lambda ws: "--out", "already holds a run"),
    ("--set of an unknown key", lambda ws: ["run", ws.config(""), "--set", "training.epoch=3"],
     lambda ws: "--set training.epoch=3", "training.epoch: unknown key (did you mean 'epochs'?)"),
    ("--set without a value", lambda ws: ["run", ws.config(""), "--set", "training.epochs"],
     lambda ws: "--set", "expected key.path=value"),
    ("missing config file", lambda ws: ["run", str(ws.root / "none.yaml")],
     lambda ws: "CONFIG", "no such file"),
    ("missing plugin file", lambda ws: ["run", ws.config(""), "--plugin", str(ws.root / "none.py")],
     lambda ws: "--plugin", "does not exist"),
    ("resume of a missing directory", lambda ws: ["run", "--resume", str(ws.root / "none")],
     lambda ws: "--resume", "is not a directory"),
    ("resume with an incompatible --set", lambda ws: ["run", "--resume", str(ws.run_copy()),
                                                      "--set", "training.epochs=5"],
     lambda ws: "--set training.epochs=5", "training.epochs: is 5 but the run in"),
    ("resume with an incompatible config file", lambda ws: ["run", ws.config("training: {epochs: 5}\n"),
                                                            "--resume", str(ws.run_copy())],
     lambda ws: str(ws.root / "case.yaml"), "training.epochs: is 5 but the run in"),
    ("resume with --out", lambda ws: ["run", "--resume", str(ws.run_copy()), "--out", str(ws.root / "x")],
     lambda ws: "--out", "drop --out"),
    ("resume after config.yaml was edited", _edited_run_config,
     lambda ws: str(ws.root / "stopped" / "config.yaml"), "training.epochs: is 2 but checkpoint.pt was written with 1"),
    ("RanPAC's M beyond the memory", lambda ws: ["run", ws.config("strategy: {name: ranpac, projection_dim: 100000}\n")],
     lambda ws: str(ws.root / "case.yaml"),
     "strategy.projection_dim: RanPAC's 100000 x 100000 fp64 ridge system needs at least 80.0 GB; "),
    ("a ViT wider than the memory", lambda ws: ["run", ws.config("backbone: {embed_dim: 16384, num_heads: 16, depth: 12}\n")],
     lambda ws: str(ws.root / "case.yaml"), "backbone.embed_dim: 12 blocks of width 16384 trained with AdamW needs at least"),
    ("a training batch beyond the memory", lambda ws: ["run", ws.config("dataset: {name: digits, image_size: 256}\ntraining: {batch_size: 1048576}\n")],
     lambda ws: str(ws.root / "case.yaml"), "training.batch_size: the activations of a training batch of 1048576"),
    ("a byte budget that holds no exemplar", lambda ws: ["run", ws.config("protocol: {memory: {bytes: 1, codec: jpeg}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.memory.bytes: 1 bytes hold no exemplar: one jpeg exemplar of "
                                            "this dataset takes at least "),
    ("ACIL's expansion beyond the memory", lambda ws: ["run", ws.config("strategy: {name: acil, expansion_size: 65536}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.expansion_size: the 1 x 65536 x 65536 fp64 recursive least squares "
                                            "needs at least "),
    ("ACIL's expansion of 0", lambda ws: ["run", ws.config("strategy: {name: acil, expansion_size: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.expansion_size: must be >= 1, got 0"),
    ("ACIL's ridge of 0", lambda ws: ["run", ws.config("strategy: {name: acil, gamma: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.gamma: must be > 0"),
    ("ACIL's block of 0 rows", lambda ws: ["run", ws.config("strategy: {name: acil, rls_batch_size: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.rls_batch_size: must be >= 1, got 0"),
    ("ACIL's tuning unknown", lambda ws: ["run", ws.config("strategy: {name: acil, tuning: lorax}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.tuning.name: unknown tuning 'lorax'"),
    ("DS-AL's negative compensation ratio", lambda ws: ["run", ws.config("strategy: {name: dsal, compensation_ratio: -1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.compensation_ratio: must be >= 0"),
    ("DS-AL's compensation ridge as text", lambda ws: ["run", ws.config("strategy: {name: dsal, gamma_comp: small}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.gamma_comp"),
    ("LoRA rank of 0", lambda ws: ["run", ws.config("strategy: {name: aper, tuning: {name: lora, rank: 0}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.tuning.rank: must be >= 1, got 0"),
    ("LoRA on an unknown layer", lambda ws: ["run", ws.config("strategy: {name: aper, tuning: {name: lora, targets: [attn.q]}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.tuning.targets"),
    ("LoRA on no layer", lambda ws: ["run", ws.config("strategy: {name: aper, tuning: {name: lora, targets: []}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.tuning.targets: needs at least one target layer"),
    ("LoRA alpha of 0", lambda ws: ["run", ws.config("strategy: {name: aper, tuning: {name: lora, alpha: 0}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.tuning.alpha: must be > 0"),
    ("LoRA dropout of 1", lambda ws: ["run", ws.config("strategy: {name: aper, tuning: {name: lora, dropout: 1.0}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.tuning.dropout: must be < 1"),
    ("FeCAM's negative shrinkage", lambda ws: ["run", ws.config("strategy: {name: fecam, alpha: -1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.alpha: must be >= 0, got -1"),
    ("FeCAM's unknown shrinkage", lambda ws: ["run", ws.config("strategy: {name: fecam, shrinkage: ledoit}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.shrinkage: "),
    ("FeCAM's unknown normalisation", lambda ws: ["run", ws.config("strategy: {name: fecam, normalization: l2}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.normalization: "),
    ("FeCAM's Tukey power of 0", lambda ws: ["run", ws.config("strategy: {name: fecam, tukey_power: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.tukey_power: must be > 0"),
    ("FeCAM's Tukey transform on a ViT's signed features", lambda ws: ["run", ws.config("strategy: {name: fecam, tuning: frozen, tukey_power: 0.5}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.tukey_power: Tukey's transform (0.5) needs non-negative features"),
    ("InfLoRA's rank of 0", lambda ws: ["run", ws.config("strategy: {name: inflora, rank: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.rank: must be >= 1, got 0"),
    ("InfLoRA's threshold above 1", lambda ws: ["run", ws.config("strategy: {name: inflora, lamb: 1.5}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.lamb: must be <= 1"),
    ("InfLoRA's falling threshold", lambda ws: ["run", ws.config("strategy: {name: inflora, lamb: 0.9, lame: 0.8}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.lame: lame 0.8 is below lamb 0.9"),
    ("InfLoRA on a ResNet", lambda ws: ["run", ws.config("backbone: {name: resnet32}\nstrategy: {name: inflora}\n")],
     lambda ws: str(ws.root / "case.yaml"), "backbone.name: this needs a ViT backbone"),
    ("CoFiMA's merge weight above 1", lambda ws: ["run", ws.config("strategy: {name: cofima, merge_weight: 1.5}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.merge_weight: must be <= 1"),
    ("CoFiMA's Fisher cap of 0", lambda ws: ["run", ws.config("strategy: {name: cofima, fisher_max: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.fisher_max: must be > 0"),
    ("CoFiMA's new head rows unknown", lambda ws: ["run", ws.config("strategy: {name: cofima, new_head_rows: zero}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.new_head_rows"),
    ("CoFiMA's old-head Fisher unknown", lambda ws: ["run", ws.config("strategy: {name: cofima, old_head_fisher: fresh}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.old_head_fisher"),
    ("CoFiMA's Fisher weighting as text", lambda ws: ["run", ws.config("strategy: {name: cofima, fisher_weighting: maybe}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.fisher_weighting"),
    ("LAE's EMA decay above 1", lambda ws: ["run", ws.config("strategy: {name: lae, ema_decay: 1.5}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.ema_decay: must be <= 1"),
    ("LAE's negative freeze epochs", lambda ws: ["run", ws.config("strategy: {name: lae, freeze_epochs: -1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.freeze_epochs: must be >= 0"),
    ("LAE's head init unknown", lambda ws: ["run", ws.config("strategy: {name: lae, head_init: zeros}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.head_init"),
    ("LAE on a frozen ViT", lambda ws: ["run", ws.config("strategy: {name: lae, tuning: frozen}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.tuning: LAE trains a parameter-efficient module"),
    ("a prefix of no tokens", lambda ws: ["run", ws.config("strategy: {name: lae, tuning: {name: prefix, length: 0}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.tuning.length: must be >= 1, got 0"),
    ("a prefix in no block", lambda ws: ["run", ws.config("strategy: {name: lae, tuning: {name: prefix, blocks: 0}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.tuning.blocks: must be >= 1, got 0"),
    ("a compensatory flag as text", lambda ws: ["run", ws.config("strategy: {name: lae, tuning: {name: prefix, compensatory: sometimes}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.tuning.compensatory"),
    ("MOS's merge momentum above 1", lambda ws: ["run", ws.config("strategy: {name: mos, adapter_momentum: 1.5}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.adapter_momentum: must be <= 1"),
    ("MOS's merge unknown", lambda ws: ["run", ws.config("strategy: {name: mos, merge: per_epoch}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.merge"),
    ("MOS reading no set", lambda ws: ["run", ws.config("strategy: {name: mos, rounds: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.rounds: must be >= 1, got 0"),
    ("MOS's orthogonality temperature of 0", lambda ws: ["run", ws.config("strategy: {name: mos, orth_temperature: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.orth_temperature: must be > 0"),
    ("MOS's negative orthogonality weight", lambda ws: ["run", ws.config("strategy: {name: mos, orth_weight: -0.1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.orth_weight: must be >= 0"),
    ("MOS's alignment LR of 0", lambda ws: ["run", ws.config("strategy: {name: mos, ca_lr: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.ca_lr: must be > 0"),
    ("MOS's alignment draws of 0", lambda ws: ["run", ws.config("strategy: {name: mos, ca_samples_per_class: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.ca_samples_per_class: must be >= 1, got 0"),
    ("MOS's head LR scale of 0", lambda ws: ["run", ws.config("strategy: {name: mos, head_lr_scale: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.head_lr_scale: must be > 0"),
    ("MOS's adapters of no width", lambda ws: ["run", ws.config("strategy: {name: mos, bottleneck: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.bottleneck: must be >= 1, got 0"),
    ("MOS's adapter scale of 0", lambda ws: ["run", ws.config("strategy: {name: mos, adapter_scale: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.adapter_scale: must be > 0"),
    ("MOS's adapter dropout of 1", lambda ws: ["run", ws.config("strategy: {name: mos, adapter_dropout: 1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.adapter_dropout: must be < 1"),
    ("MOS's negative alignment epochs", lambda ws: ["run", ws.config("strategy: {name: mos, ca_epochs: -1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.ca_epochs: must be >= 0"),
    ("MOS's head init unknown", lambda ws: ["run", ws.config("strategy: {name: mos, head_init: zeros}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.head_init"),
    ("MOS's ensemble as text", lambda ws: ["run", ws.config("strategy: {name: mos, ensemble: both}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.ensemble"),
    ("a long tail's ratio of 0", lambda ws: ["run", ws.config("protocol: {long_tail: {imbalance_ratio: 0}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.long_tail.imbalance_ratio: must be > 0"),
    ("a long tail's ratio above 1", lambda ws: ["run", ws.config("protocol: {long_tail: {imbalance_ratio: 1.5}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.long_tail.imbalance_ratio: must be <= 1"),
    ("a long tail's order unknown", lambda ws: ["run", ws.config("protocol: {long_tail: {order: random}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.long_tail.order"),
    ("gradient reweighting without a memory", lambda ws: ["run", ws.config("strategy: {name: grad_reweight}\nprotocol: {memory: {total: null, per_class: null}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.memory"),
    ("gradient reweighting's temperature of 0", lambda ws: ["run", ws.config("strategy: {name: grad_reweight, temperature: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.temperature: must be > 0"),
    ("gradient reweighting's negative gamma", lambda ws: ["run", ws.config("strategy: {name: grad_reweight, gamma: -1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.gamma: must be >= 0"),
    ("gradient reweighting's negative KD weight", lambda ws: ["run", ws.config("strategy: {name: grad_reweight, kd_weight: -1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.kd_weight: must be >= 0"),
    ("gradient reweighting's head init unknown", lambda ws: ["run", ws.config("strategy: {name: grad_reweight, head_init: zeros}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.head_init"),
    ("gradient reweighting's KD gradient floor above 1", lambda ws: ["run", ws.config("strategy: {name: grad_reweight, kd_gradient_floor: 2}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.kd_gradient_floor: must be <= 1"),
    ("gradient reweighting's logit adjustment as text", lambda ws: ["run", ws.config("strategy: {name: grad_reweight, logit_adjustment: often}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.logit_adjustment"),
    ("Coil without a memory", lambda ws: ["run", ws.config("strategy: {name: coil}\nprotocol: {memory: {total: null, per_class: null}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.memory"),
    ("Coil's Sinkhorn regulariser of 0", lambda ws: ["run", ws.config("strategy: {name: coil, sinkhorn_reg: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.sinkhorn_reg: must be > 0"),
    ("Coil's Sinkhorn iterations of 0", lambda ws: ["run", ws.config("strategy: {name: coil, sinkhorn_iterations: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.sinkhorn_iterations: must be >= 1"),
    ("Coil's cost norm below 1", lambda ws: ["run", ws.config("strategy: {name: coil, cost_norm: 0.5}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.cost_norm: must be >= 1"),
    ("Coil's temperature of 0", lambda ws: ["run", ws.config("strategy: {name: coil, temperature: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.temperature: must be > 0"),
    ("Coil's negative new-branch weight", lambda ws: ["run", ws.config("strategy: {name: coil, new_branch_weight: -1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.new_branch_weight: must be >= 0"),
    ("Coil's negative old-branch weight", lambda ws: ["run", ws.config("strategy: {name: coil, old_branch_weight: -0.1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.old_branch_weight: must be >= 0"),
    ("Coil's refresh every 0 iterations", lambda ws: ["run", ws.config("strategy: {name: coil, refresh_every: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.refresh_every: must be >= 1"),
    ("Coil's prototypes from an unknown source", lambda ws: ["run", ws.config("strategy: {name: coil, old_prototypes: test}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.old_prototypes"),
    ("Coil's Sinkhorn iterations as text", lambda ws: ["run", ws.config("strategy: {name: coil, sinkhorn_iterations: many}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.sinkhorn_iterations"),
    ("a negative initial weight decay", lambda ws: ["run", ws.config("training: {optimizer: {initial_weight_decay: -0.1}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "training.optimizer.initial_weight_decay: must be >= 0"),
    ("MEMO without a memory", lambda ws: ["run", ws.config("strategy: {name: memo}\nprotocol: {memory: {total: null, per_class: null}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.memory"),
    ("MEMO's specialised blocks of 0", lambda ws: ["run", ws.config("strategy: {name: memo, specialised_blocks: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.specialised_blocks: must be >= 1"),
    ("MEMO's specialised blocks beyond the ViT's", lambda ws: ["run", ws.config("strategy: {name: memo, specialised_blocks: 9}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.specialised_blocks"),
    ("MEMO's specialised init unknown", lambda ws: ["run", ws.config("strategy: {name: memo, specialised_init: zeros}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.specialised_init"),
    ("MEMO's negative auxiliary weight", lambda ws: ["run", ws.config("strategy: {name: memo, aux_weight: -1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.aux_weight: must be >= 0"),
    ("MEMO's train_generalised as text", lambda ws: ["run", ws.config("strategy: {name: memo, train_generalised: sometimes}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.train_generalised"),
    ("MEMO's train_old_specialised as text", lambda ws: ["run", ws.config("strategy: {name: memo, train_old_specialised: 2}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.train_old_specialised"),
    ("DER without a memory", lambda ws: ["run", ws.config("strategy: {name: expandable_representation}\nprotocol: {memory: {total: null, per_class: null}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.memory"),
    ("DER's negative auxiliary weight", lambda ws: ["run", ws.config("strategy: {name: expandable_representation, aux_weight: -0.5}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.aux_weight: must be >= 0"),
    ("DER on a ResNet", lambda ws: ["run", ws.config("backbone: {name: resnet18}\nstrategy: {name: expandable_representation}\n")],
     lambda ws: str(ws.root / "case.yaml"), "backbone.name"),
    ("FOSTER without a memory", lambda ws: ["run", ws.config("strategy: {name: foster}\nprotocol: {memory: {total: null, per_class: null}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.memory"),
    ("FOSTER's boosting beta of 1", lambda ws: ["run", ws.config("strategy: {name: foster, beta_boosting: 1.0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.beta_boosting: must be < 1"),
    ("FOSTER's negative compression beta", lambda ws: ["run", ws.config("strategy: {name: foster, beta_compression: -0.1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.beta_compression: must be >= 0"),
    ("FOSTER's negative KD weight", lambda ws: ["run", ws.config("strategy: {name: foster, kd_weight: -1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.kd_weight: must be >= 0"),
    ("FOSTER's temperature of 0", lambda ws: ["run", ws.config("strategy: {name: foster, temperature: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.temperature: must be > 0"),
    ("FOSTER's compression epochs of 0", lambda ws: ["run", ws.config("strategy: {name: foster, compression_epochs: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.compression_epochs: must be >= 1"),
    ("FOSTER's compression LR of 0", lambda ws: ["run", ws.config("strategy: {name: foster, compression_lr: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.compression_lr: must be > 0"),
    ("FOSTER's negative compression weight decay", lambda ws: ["run", ws.config("strategy: {name: foster, compression_weight_decay: -1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "strategy.compression_weight_decay: must be >= 0"),
    ("FOSTER on a ResNet", lambda ws: ["run", ws.config("backbone: {name: resnet18}\nstrategy: {name: foster}\n")],
     lambda ws: str(ws.root / "case.yaml"), "backbone.name"),
    ("weight decay on unknown parameters", lambda ws: ["run", ws.config("training: {optimizer: {weight_decay_on: biases}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "training.optimizer.weight_decay_on"),
    ("unknown LR schedule", lambda ws: ["run", ws.config("training: {scheduler: {name: quarter_cosine}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "training.scheduler.name"),
    ("zero torch threads", lambda ws: ["run", ws.config("training: {threads: 0}\n")],
     lambda ws: str(ws.root / "case.yaml"), "training.threads: must be >= 1, got 0"),
    ("negative feature cache", lambda ws: ["run", ws.config("training: {feature_cache_mb: -1}\n")],
     lambda ws: str(ws.root / "case.yaml"), "training.feature_cache_mb: must be >= 0, got -1"),
    ("feature cache as text", lambda ws: ["run", ws.config("training: {feature_cache_mb: lots}\n")],
     lambda ws: str(ws.root / "case.yaml"), "training.feature_cache_mb"),
    ("NeRV beta1 of 1", lambda ws: ["run", ws.config("protocol: {memory: {bytes: 400000, codec: {name: nerv, beta1: 1.0}}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.memory.codec.beta1: must be < 1"),
    ("NeRV target PSNR of 0", lambda ws: ["run", ws.config("protocol: {memory: {bytes: 400000, codec: {name: nerv, target_psnr: 0}}}\n")],
     lambda ws: str(ws.root / "case.yaml"), "protocol.memory.codec.target_psnr: must be > 0"),
    ("truncated checkpoint", _truncated_checkpoint,
     lambda ws: "--resume", "is not a readable checkpoint"),
    ("checkpoint of another program", _foreign_checkpoint,
     lambda ws: "--resume", "is not a checkpoint written by `incremental run`"),
]


@pytest.mark.parametrize("case, argv, where, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_file_and_key(case, argv, where, expected, finished_run, tmp_path, capsys):
    ws = Workspace(tmp_path, finished_run)
    args = argv(ws)
    if "--out" not in args and "--resume" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(where(ws) + ": "), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err


def test_the_table_is_long_enough():
    assert len(CASES) >= 20


def test_a_failed_resume_keeps_the_run_untouched(finished_run, tmp_path, capsys):
    ws = Workspace(tmp_path, finished_run)
    run = ws.run_copy()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["run", "--resume", str(run), "--set", "training.epochs=5", "--quiet"]) == 2
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("data_path, broken, content", [("loader", "broken.png", b"\x89PNG garbage"),
                                                         ("device", "broken.JPEG", b"\xff\xd8\xff garbage")])
def test_a_failure_in_a_later_experience_keeps_earlier_results(finished_run, tmp_path, capsys, data_path, broken,
                                                               content):
    """The unreadable image belongs to the second class: experience 0 completes and is kept,
    with its checkpoint, and the message says how to continue once the file is fixed. On the
    device data path the bytes are read fine and the JPEG decoder fails on them."""
    ws = Workspace(tmp_path, finished_run)
    root = write_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=2)
    (root / "train" / "b" / broken).write_bytes(content)
    config = ws.config(f"dataset: {{name: imagefolder, root: {root}, image_size: 16}}\n"
                       "protocol: {initial_classes: 0, increment: 1, class_order: sorted, memory: {total: 2}}\n"
                       f"training: {{epochs: 1, data_path: {data_path}}}\n")
    out = tmp_path / "run"
    assert main(["run", config, "--out", str(out), "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"{config}: dataset.root: cannot read image ") and broken in line
    assert line.endswith(f"continue with `incremental run --resume {out}`")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["completed_experiences"] == 1
    assert torch.load(out / CHECKPOINT_FILE, weights_only=True)["experience"] == 0
    # fixed: the run continues from its checkpoint and completes
    (root / "train" / "b" / broken).unlink()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("argv", [
    ["run", "--resume", "/nonexistent/run"],
    ["run", "no-such-protocol"],
])
def test_the_console_shows_one_line_and_no_traceback(argv):
    done = subprocess.run([sys.executable, "-m", "incremental", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
