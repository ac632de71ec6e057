"""Built-in strategies, installed as ``incremental.strategies``.

Each module registers one strategy with ``@STRATEGIES.register(name, config=...)``; the
list of modules is :data:`incremental.registry.BUILTIN_MODULES`.
"""
