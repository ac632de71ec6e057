"""Backbones by name, and the incremental network that puts a growing head on them."""

from .net import IncrementalNet, build_model

__all__ = ["IncrementalNet", "build_model"]
