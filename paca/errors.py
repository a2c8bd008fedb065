"""The errors paca raises on purpose.

``PacaError`` is the base of every error that means "the input was wrong, here is the fix":
the CLI prints it as one line and exits 2, while any other exception is a bug and keeps its
traceback. It subclasses ``ValueError`` so code written against paca's earlier ``ValueError``s
keeps catching them. Messages speak of parameters (``max_steps=0``); the CLI turns the names
of its own options into flags.

``MissingDependency`` is the one error for an optional package that is not installed: it names
the package, what needed it and the extra that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class PacaError(ValueError):
    """Bad input to paca: the message names the thing, the value and the fix."""


class MissingDependency(PacaError, ImportError):
    """An optional package is missing; ``pip install 'paca[<extra>]'`` installs it."""

    def __init__(
        self, package: str, needed_for: str, extra: str | None = None, detail: str | None = None
    ):
        self.package, self.needed_for, self.extra = package, needed_for, extra
        fix = f"pip install 'paca[{extra}]'" if extra else f"pip install {package}"
        message = f"{needed_for} needs {package}, which is not installed: {fix}"
        super().__init__(f"{needed_for} needs {package}: {detail}" if detail else message)


def require(module: str, needed_for: str, extra: str | None = None) -> ModuleType:
    """Imports ``module`` or raises ``MissingDependency`` naming ``needed_for`` and the extra.

    Only a missing top-level package counts as missing: an ``ImportError`` raised inside an
    installed package (a broken install) propagates as the bug it is.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != top:
            raise
        raise MissingDependency(top, needed_for, extra) from None
