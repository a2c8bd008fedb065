"""The error of ``paca train``'s input, below every other module of the recipe."""

from paca.errors import PacaError


class TrainError(PacaError):
    """Bad input to ``paca train``: reported in one line, exit code 2."""
