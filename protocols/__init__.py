"""Shipped protocol YAML files, installed as ``incremental.protocols``; name one by its file
stem (``incremental run digits_b0_5steps``) or copy it and ``extends:`` it."""
