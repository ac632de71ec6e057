"""Backbones by name (``options`` declares them and their options; ``net`` puts a growing head
on them). Importing this package stays light: the modules load on use."""
