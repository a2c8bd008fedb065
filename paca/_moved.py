"""Old module paths that moved in paca 0.2: each keeps working for one release, with a
``DeprecationWarning`` that names the new place."""

from __future__ import annotations

import importlib
import warnings


def forward(old: str, *new: str, renamed: dict[str, str] | None = None):
    """A module ``__getattr__`` for ``old``: warns, then returns the attribute from the first
    module of ``new`` that has it (``renamed`` maps old attribute names to new ones)."""
    renamed = renamed or {}

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        target = renamed.get(name, name)
        for module_name in new:
            module = importlib.import_module(module_name)
            if hasattr(module, target):
                warnings.warn(
                    f"{old}.{name} moved to {module_name}.{target} in paca 0.2; the old path "
                    "goes away in the next release",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, target)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
