"""Deprecated: moved to ``paca.recipes.loading`` (this path works until the next release)."""

from paca._moved import forward

__getattr__ = forward("paca.loading", "paca.recipes.loading")
