"""Deprecated: moved to ``paca.adapters.lora`` and ``paca.adapters.foreign`` (this path works
until the next release)."""

from paca._moved import forward

__getattr__ = forward(
    "paca.interop",
    "paca.adapters.lora",
    "paca.adapters.foreign",
    "paca.adapters.common",
    renamed={"read_foreign": "read", "PEFT_CONFIG": "ADAPTER_CONFIG"},
)
