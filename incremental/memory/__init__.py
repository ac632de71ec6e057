"""What the toolkit remembers of past classes: exemplar selection (``selection``), and memories
counted in bytes (``budget``) with their codecs (``codecs``, ``nerv``) and generators (``gan``)."""

from .selection import ExemplarMemory, class_quotas, extract_features, herding_order, indices_by_label

__all__ = ["ExemplarMemory", "class_quotas", "extract_features", "herding_order", "indices_by_label"]
