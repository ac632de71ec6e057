"""Malformed input through the real CLI, each in its own process: exit code 2, exactly one line
on stderr that starts with the file (or flag) and names the key, no traceback, nothing written.

Config-level cases run `python -m incremental` (they import neither torch nor Avalanche, so
each takes a fraction of a second); cases that read data or weights run the CLI's main in a
forked copy of this process. Every option added later gets its bounds in this table too.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_RUN, main_in_fork, write_cifar100, write_image_folder


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        (root / "tiny.yaml").write_text(TINY_RUN)

    def config(self, body: str, name: str = "case") -> str:
        path = self.root / f"{name}.yaml"
        path.write_text("extends: tiny.yaml\n" + body)
        return str(path)

    @property
    def case(self) -> str:
        return str(self.root / "case.yaml")


def _cifar(ws: Workspace, train: dict | None = None, meta: dict | None = None) -> list[str]:
    folder = write_cifar100(ws.root / "cifar", n_train=100, n_test=100)
    if train is not None:
        batch = pickle.loads((folder / "train").read_bytes())
        batch.update(train)
        (folder / "train").write_bytes(pickle.dumps(batch, protocol=2))
    if meta is not None:
        (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return ["check", ws.config(f"dataset: {{name: cifar100, root: {folder}}}\n")]


def _bomb_png(ws: Workspace) -> list[str]:
    root = write_image_folder(ws.root / "imgs", classes=("a", "b"), per_class=1)
    Image.new("L", (15000, 12000)).save(root / "train" / "a" / "big.png")  # past Pillow's pixel limit
    return ["run", ws.config(f"dataset: {{name: imagefolder, root: {root}, image_size: 16}}\n"
                             "protocol: {initial_classes: 0, increment: 1, class_order: sorted, memory: {total: 2}}\n"
                             "training: {epochs: 1}\n")]


def _class_list_not_utf8(ws: Workspace) -> list[str]:
    root = write_image_folder(ws.root / "imgs", classes=("a", "b"), per_class=1)
    (ws.root / "classes.txt").write_bytes(b"a\n\xff\xfe b\n")
    return ["check", ws.config(f"dataset: {{name: imagefolder, root: {root}, class_list: {ws.root / 'classes.txt'}}}\n")]


def _pickle_as_weights(ws: Workspace) -> list[str]:
    (ws.root / "weights.pt").write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}, protocol=4))
    return ["run", ws.config(f"backbone: {{pretrained: {ws.root / 'weights.pt'}}}\n")]


def _write(ws: Workspace, name: str, text: str) -> Path:
    (ws.root / name).write_text(text)
    return ws.root / name


# an open_clip config whose text tower is a Hugging Face model (xlm-roberta): it would be downloaded
HF_TEXT_CLIP = json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8},
                           "text_cfg": {"hf_model_name": "xlm-roberta-base", "hf_tokenizer_name": "xlm-roberta-base"}})


NOT_A_CLIP = json.dumps({"layers": 2})


def _fifo_config(ws: Workspace) -> list[str]:
    os.mkfifo(ws.root / "pipe.yaml")
    return ["check", str(ws.root / "pipe.yaml"), "--no-data"]


def _plugin_exits(ws: Workspace) -> list[str]:
    (ws.root / "exits.py").write_text("import sys\nsys.exit(3)\n")
    return ["check", ws.config(""), "--no-data", "--plugin", str(ws.root / "exits.py")]


def _bad_metrics(ws: Workspace) -> list[str]:
    run = ws.root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(TINY_RUN)
    (run / "metrics.json").write_text(json.dumps({"status": "complete", "accuracy_matrix": "[[1]]"}))
    return ["compare", str(run), "--out", str(ws.root / "cmp")]


def option_case(name: str, body: str, expected: str, data: bool = False) -> tuple:
    """A table row for one option's bad value: ``check`` of tiny.yaml extended by ``body``
    (without the data unless ``data``, which forks), failing on the case file with ``expected``."""
    argv = (lambda ws: ["check", ws.config(body)]) if data else (lambda ws: ["check", ws.config(body), "--no-data"])
    return (name, argv, lambda ws: ws.case, expected, "fork" if data else "fast")


def _non_utf8_yaml(ws: Workspace) -> list[str]:
    (ws.root / "latin1.yaml").write_bytes("description: caf\xe9\n".encode("latin-1"))
    return ["check", str(ws.root / "latin1.yaml"), "--no-data"]


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) + "seed: *i\n"

# (id, argv builder, expected line start, expected text naming the key, how: "fast" = a new
# interpreter, "fork" = a forked copy of this one for the cases that load data or weights)
CASES: list[tuple[str, Callable[[Workspace], list[str]], Callable[[Workspace], str], str, str]] = [
    # ---- hostile or odd YAML
    ("unhashable key", lambda ws: ["check", ws.config("? [a, b]\n: 1\n"), "--no-data"],
     lambda ws: ws.case, "a key must be a plain value, not a list", "fast"),
    ("20000 nested brackets", lambda ws: ["check", ws.config("seed: " + "[" * 20000 + "\n"), "--no-data"],
     lambda ws: ws.case, "nested deeper than 64 levels", "fast"),
    ("billion laughs", lambda ws: ["check", ws.config(BILLION_LAUGHS), "--no-data"],
     lambda ws: ws.case, "expands to more than 100000 values", "fast"),
    ("YAML that is not UTF-8", _non_utf8_yaml, lambda ws: str(ws.root / "latin1.yaml"), "cannot read", "fast"),
    ("a FIFO as the config", _fifo_config, lambda ws: "CONFIG", "is not a regular file", "fast"),
    ("a folder as the config", lambda ws: ["check", str(ws.root), "--no-data"], lambda ws: "CONFIG", "is a folder", "fast"),
    ("extends in a cycle", lambda ws: ["check", ws.config("", "tiny"), "--no-data"],
     lambda ws: str(ws.root / "tiny.yaml"), "extends: extends itself in a cycle", "fast"),
    # ---- seeds and bounds
    ("negative seed", lambda ws: ["check", ws.config("seed: -1\n"), "--no-data"],
     lambda ws: ws.case, "seed: must be >= 0, got -1", "fast"),
    ("seed 2**70", lambda ws: ["check", ws.config(f"seed: {2 ** 70}\n"), "--no-data"],
     lambda ws: ws.case, "seed: must be <= 4294967295", "fast"),
    ("negative order_seed", lambda ws: ["check", ws.config("protocol: {order_seed: -1}\n"), "--no-data"],
     lambda ws: ws.case, "protocol.order_seed: must be >= 0", "fast"),
    ("synthetic seed 2**70", lambda ws: ["check", ws.config(f"dataset: {{name: synthetic, seed: {2 ** 70}}}\n"),
                                         "--no-data"],
     lambda ws: ws.case, "dataset.seed: must be <= 4294967295", "fast"),
    ("sweep with a negative seed", lambda ws: ["sweep", ws.config(""), "--seeds", "-3", "--out", str(ws.root / "s")],
     lambda ws: "--seeds", "seeds are 0 to 4294967295, got -3", "fast"),
    ("infinite mlp_ratio", lambda ws: ["check", ws.config("backbone: {mlp_ratio: .inf}\n"), "--no-data"],
     lambda ws: ws.case, "backbone.mlp_ratio: expected a finite number", "fast"),
    ("NaN learning rate", lambda ws: ["check", ws.config("training: {optimizer: {lr: .nan}}\n"), "--no-data"],
     lambda ws: ws.case, "training.optimizer.lr: expected a finite number", "fast"),
    ("infinite weight decay blames weight_decay", lambda ws: ["check", ws.config(
        "training: {optimizer: {weight_decay: .inf}}\n"), "--no-data"],
     lambda ws: ws.case, "training.optimizer.weight_decay: expected a finite number", "fast"),
    ("embed_dim 2**40", lambda ws: ["check", ws.config(f"backbone: {{embed_dim: {2 ** 40}}}\n"), "--no-data"],
     lambda ws: ws.case, "backbone.embed_dim: must be <= 16384", "fast"),
    ("eval_batch_size 2**63", lambda ws: ["check", ws.config(f"training: {{eval_batch_size: {2 ** 63}}}\n"),
                                          "--no-data"],
     lambda ws: ws.case, "training.eval_batch_size: must be <= 1048576", "fast"),
    ("memory of 2**40 exemplars", lambda ws: ["check", ws.config(f"protocol: {{memory: {{total: {2 ** 40}}}}}\n"),
                                              "--no-data"],
     lambda ws: ws.case, "protocol.memory.total: must be <= 1000000000", "fast"),
    ("an increment of 2**70", lambda ws: ["check", ws.config(f"protocol: {{increment: [{2 ** 70}]}}\n"), "--no-data"],
     lambda ws: ws.case, "protocol.increment.0: must be <= 1000000000", "fast"),
    ("a negative class id", lambda ws: ["check", ws.config("protocol: {class_order: [-1, 0]}\n"), "--no-data"],
     lambda ws: ws.case, "protocol.class_order.0: must be >= 0", "fast"),
    ("a zero-width stem channel", lambda ws: ["check", ws.config("backbone: {stem: conv, stem_channels: [0, 8]}\n"),
                                              "--no-data"],
     lambda ws: ws.case, "backbone.stem_channels.0: must be >= 1", "fast"),
    ("a masking fraction above 1", lambda ws: ["check", ws.config("probes: [{name: masking, fractions: [1.5]}]\n"),
                                               "--no-data"],
     lambda ws: ws.case, "probes.0.fractions.0: must be < 1", "fast"),
    ("an infinite attack budget", lambda ws: ["check", ws.config("probes: [{name: adversarial, l2_eps: [.inf]}]\n"),
                                              "--no-data"],
     lambda ws: ws.case, "probes.0.l2_eps.0: expected a finite number", "fast"),
    ("5000 workers", lambda ws: ["check", ws.config("training: {num_workers: 5000}\n"), "--no-data"],
     lambda ws: ws.case, "training.num_workers: must be <= 1024", "fast"),
    ("workers neither a number nor auto", lambda ws: ["check", ws.config("training: {num_workers: many}\n"), "--no-data"],
     lambda ws: ws.case, "training.num_workers: expected an integer or one of 'auto', got 'many'", "fast"),
    ("warmup longer than training", lambda ws: ["check", ws.config(
        "training: {epochs: 2, scheduler: {warmup_epochs: 5}}\n"), "--no-data"],
     lambda ws: ws.case, "training.scheduler.warmup_epochs: 5 warmup epochs exceed training.epochs (2)", "fast"),
    ("a wrongly typed --set", lambda ws: ["check", ws.config(""), "--no-data", "--set", "seed=abc"],
     lambda ws: "--set seed=abc", "seed: expected an integer, got 'abc'", "fast"),
    # ---- --set
    ("--set into an empty list", lambda ws: ["check", ws.config(""), "--no-data", "--set", "probes.0.name=masking"],
     lambda ws: "--set probes.0.name=masking", "probes: has 0 item(s), so there is no item 0", "fast"),
    ("--set past the end of a list", lambda ws: ["check", ws.config("probes: [masking]\n"), "--no-data",
                                                 "--set", "probes.3.name=ood"],
     lambda ws: "--set probes.3.name=ood", "probes: has 1 item(s), so there is no item 3", "fast"),
    ("--set with a key written twice", lambda ws: ["check", ws.config(""), "--no-data",
                                                   "--set", "training={epochs: 1, epochs: 9}"],
     lambda ws: "--set training={epochs: 1, epochs: 9}", "training: key 'epochs' is written twice", "fast"),
    ("--set of another component's name", lambda ws: ["check", ws.config("strategy: {name: replay, selection: random}\n"),
                                                      "--no-data", "--set", "strategy.name=finetune"],
     lambda ws: ws.case, "--set strategy=finetune replaces the whole section", "fast"),
    # ---- files and flags
    ("--plugin that is a folder", lambda ws: ["check", ws.config(""), "--no-data", "--plugin", str(ws.root)],
     lambda ws: "--plugin", "is a folder; a plugin is a .py file", "fast"),
    ("--plugin that calls sys.exit", _plugin_exits, lambda ws: "--plugin", "called sys.exit(3) while being imported",
     "fast"),
    ("output.root that is a file", lambda ws: ["run", ws.config(f"output: {{root: {ws.root / 'tiny.yaml'}}}\n")],
     lambda ws: ws.case, "output.root: cannot write to", "fork"),
    ("CUDA asked for without a GPU, at check", lambda ws: ["check", ws.config("training: {device: cuda}\n"),
                                                           "--no-data"],
     lambda ws: ws.case, "training.device: cuda requested but no CUDA device", "fork"),
    ("compare on a malformed metrics.json", _bad_metrics, lambda ws: str(ws.root / "run" / "metrics.json"),
     "accuracy_matrix: expected lower-triangular rows", "fast"),
    # ---- data values
    ("CIFAR data that is a string", lambda ws: _cifar(ws, train={b"data": "pixels"}),
     lambda ws: ws.case, "dataset.root: ", "fork"),
    ("CIFAR labels that are None", lambda ws: _cifar(ws, train={b"fine_labels": None}),
     lambda ws: ws.case, "fine_labels is a NoneType, not a list of labels", "fork"),
    ("CIFAR labels that are bytes", lambda ws: _cifar(ws, train={b"fine_labels": b"\x00\x01"}),
     lambda ws: ws.case, "fine_labels is a bytes, not a list of labels", "fork"),
    ("CIFAR pixels above 255", lambda ws: _cifar(ws, train={b"data": np.full((100, 3072), 300.0)}),
     lambda ws: ws.case, "data holds values in [300.0, 300.0], not whole pixels in 0..255", "fork"),
    ("CIFAR class names that are a number", lambda ws: _cifar(ws, meta={b"fine_label_names": 7}),
     lambda ws: ws.case, "fine_label_names is a int, not a list of names", "fork"),
    ("a decompression-bomb PNG", _bomb_png, lambda ws: ws.case, "could be decompression bomb", "fork"),
    ("a class list that is not UTF-8", _class_list_not_utf8,
     lambda ws: ws.case, "dataset.class_list: cannot read", "fork"),
    ("a raw pickle as weights", _pickle_as_weights, lambda ws: ws.case, "backbone.pretrained: ", "fork"),
    # ---- the pre-trained-model methods
    ("an unknown tuning", lambda ws: ["check", ws.config("strategy: {name: aper, tuning: adaptr}\n"), "--no-data"],
     lambda ws: ws.case, "strategy.tuning.name: unknown tuning 'adaptr' (did you mean 'adapter'?)", "fast"),
    ("a zero-width adapter", lambda ws: ["check", ws.config(
        "strategy: {name: ranpac, tuning: {name: adapter, bottleneck: 0}}\n"), "--no-data"],
     lambda ws: ws.case, "strategy.tuning.bottleneck: must be >= 1", "fast"),
    ("RanPAC holding out everything", lambda ws: ["check", ws.config(
        "strategy: {name: ranpac, validation_fraction: 1.0}\n"), "--no-data"],
     lambda ws: ws.case, "strategy.validation_fraction: must be < 1", "fast"),
    ("L2P choosing more prompts than its pool", lambda ws: ["check", ws.config(
        "strategy: {name: l2p, pool_size: 4, top_k: 5}\n"), "--no-data"],
     lambda ws: ws.case, "strategy.top_k: top_k 5 exceeds pool_size 4", "fast"),
    ("a pretrained_tag that is a number", lambda ws: ["check", ws.config("backbone: {pretrained_tag: 5}\n"),
                                                      "--no-data"],
     lambda ws: ws.case, "backbone.pretrained_tag: expected a string, got 5", "fast"),
    ("E-prompts past the ViT's depth", lambda ws: ["check", ws.config(
        "strategy: {name: dualprompt, g_layers: [0], e_layers: [0, 7]}\n")],
     lambda ws: ws.case, "strategy.e_layers: blocks [7] do not exist: the backbone has 1 (0..0)", "fork"),
    ("prompts on a ResNet", lambda ws: ["run", ws.config("strategy: l2p\nbackbone: {name: resnet32}\n")],
     lambda ws: ws.case, "backbone.name: this needs a ViT backbone", "fork"),
    # ---- memories in bytes and generative replay
    ("a negative byte budget", lambda ws: ["check", ws.config("protocol: {memory: {bytes: -5}}\n"), "--no-data"],
     lambda ws: ws.case, "protocol.memory.bytes: must be >= 1", "fast"),
    ("bytes and a total together", lambda ws: ["check", ws.config(
        "protocol: {memory: {bytes: 1000, total: 20}}\n"), "--no-data"],
     lambda ws: ws.case, "protocol.memory.bytes: set one of total, per_class and bytes, not total and bytes", "fast"),
    ("an unknown codec", lambda ws: ["check", ws.config("protocol: {memory: {bytes: 1000, codec: jpg}}\n"), "--no-data"],
     lambda ws: ws.case, "protocol.memory.codec.name: unknown codec 'jpg' (did you mean 'jpeg'?)", "fast"),
    ("JPEG quality 0", lambda ws: ["check", ws.config(
        "protocol: {memory: {bytes: 1000, codec: {name: jpeg, quality: 0}}}\n"), "--no-data"],
     lambda ws: ws.case, "protocol.memory.codec.quality: must be >= 1", "fast"),
    ("NeRV pruned away", lambda ws: ["check", ws.config(
        "protocol: {memory: {bytes: 1000, codec: {name: nerv, prune: 1.0}}}\n"), "--no-data"],
     lambda ws: ws.case, "protocol.memory.codec.prune: must be <= 0.95", "fast"),
    ("a codec without a byte budget", lambda ws: ["check", ws.config("protocol: {memory: {codec: nerv}}\n"), "--no-data"],
     lambda ws: ws.case, "protocol.memory.codec: codec 'nerv' stores exemplars under a byte budget", "fast"),
    ("a GAN mix ratio of 1", lambda ws: ["check", ws.config("strategy: {name: gan_replay, mix_ratio: 1.0}\n"),
                                         "--no-data"],
     lambda ws: ws.case, "strategy.mix_ratio: must be <= 0.95", "fast"),
    ("a misspelt GAN loss", lambda ws: ["check", ws.config("strategy: {name: gan_replay, loss: hinj}\n"), "--no-data"],
     lambda ws: ws.case, "strategy.loss: expected", "fast"),
    ("a 2-wide generator", lambda ws: ["check", ws.config("strategy: {name: gan_replay, width: 2}\n"), "--no-data"],
     lambda ws: ws.case, "strategy.width: must be >= 4", "fast"),
    ("a GAN width search capped at 2", lambda ws: ["check", ws.config("strategy: {name: gan_replay, max_width: 2}\n"),
                                                    "--no-data"],
     lambda ws: ws.case, "strategy.max_width: must be >= 4", "fast"),
    ("iCaRL under a byte budget", lambda ws: ["check", ws.config("strategy: icarl\nprotocol: {memory: {bytes: 9000}}\n")],
     lambda ws: ws.case, "protocol.memory.bytes: strategy 'icarl' counts its memory in exemplars", "fork"),
    ("a budget smaller than any generator", lambda ws: ["check", ws.config(
        "strategy: gan_replay\nprotocol: {memory: {bytes: 1000}}\n")],
     lambda ws: ws.case, "protocol.memory.bytes: the smallest generator (width 4) takes", "fork"),
    ("a generator wider than its budget", lambda ws: ["check", ws.config(
        "strategy: {name: gan_replay, width: 64}\nprotocol: {memory: {bytes: 20000}}\n")],
     lambda ws: ws.case, "strategy.width: a generator of width 64 takes", "fork"),
    ("a GAN at 24 px", lambda ws: ["check", ws.config("strategy: gan_replay\ndataset: {name: digits, image_size: 24}\n")],
     lambda ws: ws.case, "dataset.image_size: gan_replay: the GAN generates images of 4 * 2^k pixels", "fork"),
    ("bytes of image files", lambda ws: ["check", ws.config(
        f"dataset: {{name: imagefolder, root: {write_image_folder(ws.root / 'imgs', classes=('a', 'b'), per_class=2)}}}\n"
        "protocol: {initial_classes: 1, increment: 1, memory: {bytes: 9000}}\n")],
     lambda ws: ws.case, "dataset.name: a memory in bytes (protocol.memory.bytes) stores or generates", "fork"),
    # vision-language backbones and class-name strategies
    ("a template without a name slot", lambda ws: ["check", ws.config("protocol: {templates: ['a photo']}\n"),
                                                    "--no-data"],
     lambda ws: ws.case, "protocol.templates.0: 'a photo' needs one '{}' where the class name goes", "fast"),
    ("no templates", lambda ws: ["check", ws.config("protocol: {templates: []}\n"), "--no-data"],
     lambda ws: ws.case, "protocol.templates: must list at least one template", "fast"),
    ("a misspelt template set", lambda ws: ["check", ws.config("protocol: {templates: [openai_imagnet]}\n"),
                                            "--no-data"],
     lambda ws: ws.case, "(did you mean 'openai_imagenet'", "fast"),
    ("a misspelt head_init", lambda ws: ["check", ws.config("backbone: {name: clip, head_init: txt}\n"), "--no-data"],
     lambda ws: ws.case, "backbone.head_init: expected", "fast"),
    ("a CLIP at 4 px", lambda ws: ["check", ws.config("backbone: {name: clip, img_size: 4}\n"), "--no-data"],
     lambda ws: ws.case, "backbone.img_size: must be >= 8", "fast"),
    ("an unknown CLIP architecture", lambda ws: ["check", ws.config("backbone: {name: clip, model: ViT-B-61}\n")],
     lambda ws: ws.case, "backbone.model: unknown open_clip architecture 'ViT-B-61' (did you mean", "fork"),
    ("a missing CLIP config file", lambda ws: ["check", ws.config(
        f"backbone: {{name: clip, config_file: {ws.root / 'none.json'}}}\n")],
     lambda ws: ws.case, "backbone.config_file: ", "fork"),
    ("a CLIP config file that is not JSON", lambda ws: ["check", ws.config(
        f"backbone: {{name: clip, config_file: {_write(ws, 'arch.json', '{embed_dim: 1')}}}\n")],
     lambda ws: ws.case, "backbone.config_file: cannot read", "fork"),
    ("a JSON file that is no CLIP config", lambda ws: ["check", ws.config(
        f"backbone: {{name: clip, config_file: {_write(ws, 'arch.json', NOT_A_CLIP)}}}\n")],
     lambda ws: ws.case, "backbone.config_file: ", "fork"),
    ("a text tower that would be downloaded", lambda ws: ["check", ws.config(
        f"backbone: {{name: clip, config_file: {_write(ws, 'arch.json', HF_TEXT_CLIP)}}}\n")],
     lambda ws: ws.case, "backbone.config_file: ", "fork"),
    ("zero-shot on a backbone without text", lambda ws: ["check", ws.config("strategy: zeroshot\n")],
     lambda ws: str(ws.root / "tiny.yaml"), "backbone.name: strategy 'zeroshot' writes classifiers from class names", "fork"),
    ("PROOF on a backbone without text", lambda ws: ["check", ws.config("strategy: proof\n")],
     lambda ws: str(ws.root / "tiny.yaml"), "backbone.name: strategy 'proof' writes classifiers from class names", "fork"),
    ("text OOD scores without text", lambda ws: ["check", ws.config("probes: [{name: ood, head: text}]\n")],
     lambda ws: ws.case, "probes.0.head: 'text' scores with a text tower", "fork"),
    option_case('a zero OOD text temperature', 'probes: [{name: ood, head: text, temperature: 0}]\n',
                'probes.0.temperature: must be > 0'),
    option_case('an OOD temperature on the logits head', 'probes: [{name: ood, temperature: 0.5}]\n',
                "probes.0.temperature: the temperature divides the text head's cosine similarities"),
    option_case('GELU for weights trained with QuickGELU', 'backbone: {name: clip, model: ViT-B-32, pretrained_tag: openai, quick_gelu: false}\nstrategy: zeroshot\n',
                "backbone.quick_gelu: pretrained_tag 'openai' names weights trained with QuickGELU", data=True),
    option_case('continual_clip on a random CLIP', 'backbone: {name: clip, model: clip-tiny}\nstrategy: continual_clip\n',
                "backbone.pretrained: strategy 'continual_clip' classifies by what a pre-trained CLIP knows", data=True),
    option_case('random_weights not a boolean', 'backbone: {name: clip, model: clip-tiny, random_weights: 2}\n',
                'backbone.random_weights: expected'),
    option_case('quick_gelu not a boolean', 'backbone: {name: clip, model: clip-tiny, quick_gelu: maybe}\n',
                'backbone.quick_gelu: expected'),
    ("a misspelt zero-shot class set", lambda ws: ["check", ws.config("strategy: {name: zeroshot, classes: sen}\n"),
                                                   "--no-data"],
     lambda ws: ws.case, "strategy.classes: expected", "fast"),
    ("a zero-temperature CLIP distillation", lambda ws: ["check", ws.config(
        "strategy: {name: clip_replay, temperature: 0}\n"), "--no-data"],
     lambda ws: ws.case, "strategy.temperature: must be > 0", "fast"),
    ("a negative CLIP distillation weight", lambda ws: ["check", ws.config(
        "strategy: {name: clip_replay, distill_weight: -1}\n"), "--no-data"],
     lambda ws: ws.case, "strategy.distill_weight: must be >= 0", "fast"),
    ("no PROOF context prompts", lambda ws: ["check", ws.config("strategy: {name: proof, prompt_length: 0}\n"),
                                             "--no-data"],
     lambda ws: ws.case, "strategy.prompt_length: must be >= 1", "fast"),
    ("PROOF dropout 1", lambda ws: ["check", ws.config("strategy: {name: proof, dropout: 1.0}\n"), "--no-data"],
     lambda ws: ws.case, "strategy.dropout: must be < 1", "fast"),
    option_case('an adapter dropout of 1', 'strategy: {name: aper, tuning: {name: adapter, dropout: 1.0}}\n',
                'strategy.tuning.dropout: must be < 1'),
    option_case('a negative EASE adapter dropout', 'strategy: {name: ease, adapter_dropout: -0.1}\n',
                'strategy.adapter_dropout: must be >= 0'),
    option_case('a misspelt SLCA head choice', 'strategy: {name: slca, head_after_alignment: restored}\n',
                'strategy.head_after_alignment: expected'),
    option_case("SLCA's frozen heads not a boolean", 'strategy: {name: slca, freeze_old_heads: 3}\n',
                'strategy.freeze_old_heads: expected'),
    option_case('a misspelt gan_replay labelling', 'strategy: {name: gan_replay, labels: teacher}\n',
                'strategy.labels: expected'),
    option_case('a misspelt RanPAC classifier', 'strategy: {name: ranpac, classifier: cos}\n',
                'strategy.classifier: expected'),
    option_case('a RanPAC precision torch does not solve in', 'strategy: {name: ranpac, precision: float16}\n',
                'strategy.precision: expected'),
    option_case("a misspelt APER first-session head", 'strategy: {name: aper, first_session_head: cos}\n',
                'strategy.first_session_head: expected'),
    option_case("RanPAC's first-session head not a string", 'strategy: {name: ranpac, first_session_head: [cosine]}\n',
                'strategy.first_session_head: expected'),
    option_case("EASE's recalc_sim not a boolean", 'strategy: {name: ease, recalc_sim: sometimes}\n',
                'strategy.recalc_sim: expected'),
    option_case("EASE's use_reweight not a boolean", 'strategy: {name: ease, use_reweight: 2}\n',
                'strategy.use_reweight: expected'),
    option_case('a negative EASE reweighting alpha', 'strategy: {name: ease, alpha: -0.1}\n',
                'strategy.alpha: must be >= 0'),
    option_case('a misspelt EASE training head', 'strategy: {name: ease, training_head: cosin}\n',
                'strategy.training_head: expected'),
    option_case('a raw codec stored at 0 pixels', 'protocol: {memory: {bytes: 100000, codec: {name: raw, size: 0}}}\n',
                'protocol.memory.codec.size: must be >= 1'),
    option_case('a misspelt NeRV quantisation', 'protocol: {memory: {bytes: 100000, codec: {name: nerv, quantization: per_row}}}\n',
                'protocol.memory.codec.quantization: expected'),
    option_case('a misspelt Frechet space', 'strategy: {name: gan_replay, frechet_space: inception}\n',
                'strategy.frechet_space: expected'),
    option_case('a misspelt SSF init', 'strategy: {name: aper, tuning: {name: ssf, init: pilots}}\n',
                'strategy.tuning.init: expected'),
    option_case('a misspelt DualPrompt head init', 'strategy: {name: dualprompt, head_init: normal}\n',
                'strategy.head_init: expected'),
    option_case('a misspelt SLCA head init', 'strategy: {name: slca, head_init: zeros}\n',
                'strategy.head_init: expected'),
    option_case("SSF's patch embedding not a boolean", 'strategy: {name: aper, tuning: {name: ssf, patch_embed: 7}}\n',
                'strategy.tuning.patch_embed: expected'),
    option_case('a misspelt L2P head init', 'strategy: {name: l2p, head_init: trunc}\n',
                'strategy.head_init: expected'),
    option_case('a misspelt DualPrompt E-prompt init', 'strategy: {name: dualprompt, e_prompt_init: prev}\n',
                'strategy.e_prompt_init: expected'),
    ("a misspelt PROOF fusion", lambda ws: ["check", ws.config("strategy: {name: proof, fusion: batches}\n"),
                                            "--no-data"],
     lambda ws: ws.case, "strategy.fusion: expected", "fast"),
    ("a missing class-names file", lambda ws: ["check", ws.config(
        f"dataset: {{name: imagefolder, root: {write_image_folder(ws.root / 'imgs', classes=('a', 'b'), per_class=1)}, "
        f"class_names: {ws.root / 'names.txt'}}}\n")],
     lambda ws: ws.case, "dataset.class_names: ", "fork"),
    ("a class-names file that skips a folder", lambda ws: ["check", ws.config(
        f"dataset: {{name: imagefolder, root: {write_image_folder(ws.root / 'imgs', classes=('a', 'b'), per_class=1)}, "
        f"class_names: {_write(ws, 'names.txt', 'a apple')}}}\n")],
     lambda ws: ws.case, "dataset.class_names: ", "fork"),
]


def _run(args: list[str], how: str, capfd) -> tuple[int, str]:
    if how == "fork":
        code = main_in_fork(*args, quiet=False)
        return code, capfd.readouterr().err
    done = subprocess.run([sys.executable, "-m", "incremental", *args], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr


@pytest.mark.parametrize("case, argv, where, expected, how", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line(case, argv, where, expected, how, tmp_path, capfd):
    ws = Workspace(tmp_path)
    args = argv(ws)
    if args[0] == "run":
        args += ["--quiet"] + ([] if "output: {root" in Path(args[1]).read_text() else ["--out", str(tmp_path / "out")])
    capfd.readouterr()
    code, err = _run(args, how, capfd)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(where(ws) + ": "), lines[0]
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing started, nothing left behind


def test_the_table_covers_the_reported_inputs():
    assert len(CASES) >= 40


def test_an_out_path_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path):
    ws = Workspace(tmp_path)
    out = os.fsencode(str(tmp_path)) + b"/run-\xff"
    done = subprocess.run([sys.executable, "-m", "incremental", "run", ws.config(""), "--quiet", "--out", out],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("--out: ") and "is not a valid UTF-8 path" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.yaml", "tiny.yaml"]


# ------------------------------------------------------------------ accepted on purpose


def test_merge_keys_are_valid_yaml(tmp_path):
    ws = Workspace(tmp_path)
    config = ws.config("defaults: &defaults {epochs: 2, batch_size: 8}\n")
    Path(config).write_text("extends: tiny.yaml\ntraining:\n  <<: {epochs: 2, batch_size: 8}\n  epochs: 3\n")
    done = subprocess.run([sys.executable, "-m", "incremental", "check", config, "--no-data"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "  epochs: 3\n" in done.stdout and "  batch_size: 8\n" in done.stdout


def test_a_child_memory_budget_replaces_the_parents_alternative(tmp_path):
    """total and per_class are alternatives: a child (or --set) choosing one drops the other."""
    (tmp_path / "parent.yaml").write_text(TINY_RUN.replace("memory: {total: 30}", "memory: {per_class: 5}"))
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\nprotocol: {memory: {total: 60}}\n")
    done = subprocess.run([sys.executable, "-m", "incremental", "check", str(tmp_path / "child.yaml"), "--no-data",
                           "--set", "protocol.memory.per_class=7"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "    per_class: 7\n" in done.stdout and "    total: null\n" in done.stdout
    done = subprocess.run([sys.executable, "-m", "incremental", "check", str(tmp_path / "child.yaml"), "--no-data"],
                          capture_output=True, text=True, timeout=120)
    assert "    total: 60\n" in done.stdout and "    per_class: null\n" in done.stdout


def test_yaml_off_means_off(tmp_path):
    ws = Workspace(tmp_path)
    done = subprocess.run([sys.executable, "-m", "incremental", "check", ws.config("output: {checkpoint: off}\n"),
                           "--no-data"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "  checkpoint: 'off'\n" in done.stdout, done.stderr


def test_every_numeric_option_has_bounds():
    """Each int or float field of every config class (the run's and every registered
    component's) has a lower and an upper bound, so no option can ask for 2**40 of anything."""
    import dataclasses
    import typing

    from incremental.config import RunConfig
    from incremental.config.schema import PretrainConfig
    from incremental.registry import REGISTRIES, load_builtins

    load_builtins()
    classes = {RunConfig, PretrainConfig}
    for registry in REGISTRIES.values():
        classes |= {e.config_cls for e in registry if e.config_cls is not None}
        if registry.common_options is not None:
            classes.add(registry.common_options)
    seen, missing = set(), []
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            leaves = {a for a in [tp, *typing.get_args(tp), *(x for a in typing.get_args(tp) for x in typing.get_args(a))]
                      if isinstance(a, type)}
            classes |= {a for a in leaves if dataclasses.is_dataclass(a)}
            if {int, float} & leaves and not ({"ge", "gt"} & f.metadata.keys() and {"le", "lt"} & f.metadata.keys()):
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, missing
