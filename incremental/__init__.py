"""Class-incremental learning with Vision Transformers, built on Avalanche and timm.

The package root stays light on purpose: importing it pulls in neither torch nor
Avalanche, so the command line starts fast and only loads what a command needs.
"""

__version__ = "0.1.0"
