"""Deprecated: moved to ``paca.recipes.bench`` (this path works until the next release)."""

from paca._moved import forward

__getattr__ = forward("paca.bench", "paca.recipes.bench")
