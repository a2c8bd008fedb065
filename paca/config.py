"""PacaConfig: the settings of one PaCA adaptation, as a plain JSON-serialisable dataclass.

Imports: ``paca.selection`` (the strategy names it validates).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paca import selection
from paca.errors import PacaError

MODES = ("auto", "merged", "additive")


@dataclass
class PacaConfig:
    """Settings of a PaCA adaptation.

    Attributes:
        r (int): number of input columns trained per adapted layer.
        alpha (float): scaling numerator; the trained columns are
            ``W0[:, idx] + (alpha / r) * delta``.
        target_modules (list[str] | str | None): which linear layers to adapt. A list holds
            name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); a string is
            a regular expression matched against the full module name, or ``"all-linear"``
            (every linear layer except the output head); ``None`` picks a default for known
            architectures (LLaMA/Mistral/Qwen/Gemma, GPT-2, BERT-like, DistilBERT).
        exclude_modules (list[str] | str | None): layers to leave alone, same syntax as
            ``target_modules``.
        trainable_modules (list[str] | None): modules trained in full beside the adapters (a
            freshly initialised classification head, say), matched as name suffixes. ``None``
            picks the head of ``*ForSequenceClassification``/``*ForTokenClassification`` models.
            They are saved with the adapter.
        selection (str): how the ``r`` columns are chosen: ``random`` (default),
            ``weight-norm``, ``activation`` or ``gradient`` (the last two need calibration
            batches), or any strategy registered in ``paca.selection``.
        seed (int): seed of the column selection; the choice does not depend on the global RNG.
        device (str): ``"auto"``, ``"cpu"``, ``"cuda"``, ``"hpu"``, ``"xpu"``, ``"mps"``
            (optionally with an index, ``"cuda:1"``). The model is moved there and that
            backend's kernels are used.
        mode (str): ``"merged"`` keeps the trained columns inside the frozen weight (same GEMMs
            as the frozen model); ``"additive"`` runs the base layer untouched and adds
            ``s * x[..., idx] @ delta.T`` (quantized, sharded or hooked layers); ``"auto"`` picks
            merged where it is safe and additive elsewhere.
    """

    r: int = 8
    alpha: float = 16.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    trainable_modules: list[str] | None = None
    selection: str = "random"
    seed: int = 0
    device: str = "auto"
    mode: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise PacaError(f"PacaConfig.r must be a positive integer, got r={self.r!r}; try r=8")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise PacaError(f"PacaConfig.alpha must be a number, got alpha={self.alpha!r}")
        if not self.alpha > 0:
            raise PacaError(f"PacaConfig.alpha must be > 0, got alpha={self.alpha!r}; try alpha=16")
        self.alpha = float(self.alpha)
        if self.mode not in MODES:
            raise PacaError(f"PacaConfig.mode={self.mode!r} is not one of {MODES}")
        if self.selection not in selection.STRATEGIES:
            raise PacaError(
                f"PacaConfig.selection={self.selection!r} is unknown; choose one of "
                f"{', '.join(selection.STRATEGIES)}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PacaError(f"PacaConfig.seed must be an integer, got seed={self.seed!r}")
        # torch.device is accepted for convenience and stored as text so the config stays JSON.
        self.device = str(self.device)
        for key in ("target_modules", "exclude_modules", "trainable_modules"):
            value = getattr(self, key)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, key, value)
            if value is None or isinstance(value, str) and key != "trainable_modules":
                continue
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise PacaError(
                    f"PacaConfig.{key} must be a list of module names"
                    + (", a regular expression or 'all-linear'" if key == "target_modules" else "")
                    + f", got {value!r}"
                )

    @property
    def scaling(self) -> float:
        """``alpha / r``: the factor applied to ``delta``."""
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PacaConfig:
        """Builds a config from ``to_dict()`` output; unknown keys are an error that names them."""
        if not isinstance(data, dict):
            raise PacaError(f"a PaCA config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PacaError(
                f"unknown PaCA config keys {unknown}; known keys are {sorted(known)} "
                "(was the file written by a newer paca?)"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PacaConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PacaConfig:
        return cls.from_json(Path(path).read_text())
