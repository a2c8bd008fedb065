"""How much of a model trains: ``trainable_parameters`` and its printout.

Imports: ``paca.model`` (to count adapted layers).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from paca.model import paca_layers


@dataclass
class ParameterCount:
    """How much of a model trains."""

    trainable: int
    total: int
    adapted_layers: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f} || PaCA layers: {self.adapted_layers}"
        )


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Counts trainable and total parameters (each shared tensor once) and adapted layers."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return ParameterCount(trainable, total, len(paca_layers(model)))


def print_trainable_parameters(model: nn.Module) -> None:
    print(trainable_parameters(model))
