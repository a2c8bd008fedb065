"""Deprecated: moved to ``paca.adapters`` (this path works until the next release)."""

from paca._moved import forward

__getattr__ = forward("paca.checkpoint", "paca.adapters.paca_format", "paca.adapters.common")
