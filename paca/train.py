"""Deprecated: moved to ``paca.recipes.train`` (this path works until the next release)."""

from paca._moved import forward

__getattr__ = forward("paca.train", "paca.recipes.train")
