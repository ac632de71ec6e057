"""Shared helpers. Tests run the real torch, timm, Avalanche and TensorBoard code on small
data that the tests write themselves (or scikit-learn's bundled digits)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

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
