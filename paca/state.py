"""What paca keeps on an adapted model: one ``PacaState`` object, ``model.paca_state``.

Per-layer state (``delta``, ``idx``, scaling) lives in the ``PacaLinear`` modules themselves;
this is the model-level rest: every adapter's config, which one is active, the ``requires_grad``
flags to give back on ``unload``/``merge``, and the cost of a calibrated column selection.
``unload`` and ``merge`` remove the object, so nothing of paca is left on the model.

Imports: ``paca.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from paca.config import PacaConfig

ATTRIBUTE = "paca_state"


@dataclass
class PacaState:
    """Model-level PaCA state.

    Attributes:
        configs (dict[str, PacaConfig]): every adapter's settings, in the order they were added.
        active (str): the active adapter's name.
        requires_grad (dict[str, bool]): each parameter's flag before ``enable`` froze it.
        calibration (dict | None): the cost report of a calibrated column selection
            (``selection="activation"`` or ``"gradient"``) at ``enable``.
    """

    configs: dict[str, PacaConfig]
    active: str
    requires_grad: dict[str, bool] = field(default_factory=dict)
    calibration: dict | None = None

    @property
    def config(self) -> PacaConfig:
        """The active adapter's config."""
        return self.configs[self.active]


def get(model: nn.Module) -> PacaState | None:
    """The model's ``PacaState``, or ``None`` if paca has not adapted it."""
    state = model.__dict__.get(ATTRIBUTE)
    return state if isinstance(state, PacaState) else None


def attach(model: nn.Module, state: PacaState) -> None:
    # a plain attribute (not a submodule or buffer): state_dict and .to() never see it
    model.__dict__[ATTRIBUTE] = state


def detach(model: nn.Module) -> None:
    model.__dict__.pop(ATTRIBUTE, None)
