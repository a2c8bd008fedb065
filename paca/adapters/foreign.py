"""Reading PaCA adapters written by others: PEFT's PaCA (``peft>=0.22``, and its development
branch) and the PaCA authors' fork of PEFT. Both have ``adapter_config.json`` with
``peft_type: "PACA"`` and ``adapter_model.safetensors``; ``read`` converts them into what
paca's own format holds.

Imports: ``paca.model`` (``base_linear``), ``paca.layer``, ``paca.base_layer``, ``paca.config``,
``paca.adapters.common``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from paca.adapters.common import (
    ADAPTER_CONFIG,
    FORMAT,
    FORMAT_VERSION,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
)
from paca.base_layer import is_conv1d, linear_shape, read_cols
from paca.config import PacaConfig
from paca.errors import PacaError
from paca.layer import PacaLinear, columns_problem
from paca.model import base_linear

logger = logging.getLogger("paca")

_FOREIGN_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.paca_(?P<kind>delta|w|indices)(?:\.(?:default|weight))?$"
)


def is_foreign(directory: Path) -> bool:
    """Whether ``directory`` holds a PEFT-style PaCA adapter (``peft_type: "PACA"``)."""
    config = directory / ADAPTER_CONFIG
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and str(data.get("peft_type", "")).upper() == "PACA"


def read(directory: Path, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor], str]:
    """Converts a PEFT PaCA branch or original-authors adapter into paca's own format.

    Both store ``r``, an alpha (``paca_alpha``, else ``lora_alpha``, else ``r``) and per layer
    ``paca_indices``. The PEFT branch stores ``paca_delta``, which is paca's ``delta`` (the
    update of the columns is ``(alpha / r) * delta``). The authors' code stores ``paca_w``, the
    trained columns themselves divided by the scaling, so
    ``delta = paca_w - W0[:, idx] / scaling``: that needs the base weights of ``model``.

    Returns:
        (meta, tensors, note): what ``paca.adapters.paca_format`` reads, and a sentence on
        what was done.
    """
    config = json.loads((directory / ADAPTER_CONFIG).read_text())  # is_foreign parsed it
    weights = directory / PEFT_WEIGHTS
    if not weights.is_file():
        raise PacaError(f"{weights} not found (only safetensors PaCA adapters are read)")
    try:
        raw = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise PacaError(f"{weights} is corrupted or truncated ({exc})") from exc
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise PacaError(f"{directory / ADAPTER_CONFIG} has r={r!r}; a PaCA adapter needs r >= 1")
    alpha = _alpha(config, r, directory / ADAPTER_CONFIG)
    scaling = alpha / r
    layers: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    modules_to_save = config.get("modules_to_save") or []
    for key, value in raw.items():
        match = _FOREIGN_KEY.match(key)
        if match:
            layers.setdefault(match["module"], {})[match["kind"]] = value
            continue
        plain = key.removeprefix(PEFT_PREFIX)
        owner = next((m for m in modules_to_save if plain.startswith(m + ".")), None)
        if owner is None:
            raise PacaError(
                f"{weights}: unexpected tensor {key!r} "
                "(neither a PaCA tensor nor part of modules_to_save)"
            )
        saved.setdefault(owner, {})[plain[len(owner) + 1 :]] = value
    kinds = {frozenset(parts) for parts in layers.values()}
    if (
        not layers
        or len(kinds) != 1
        or next(iter(kinds))
        not in (
            {"delta", "indices"},
            {"w", "indices"},
        )
    ):
        raise PacaError(
            f"{weights}: expected paca_delta or paca_w with paca_indices for every layer"
        )
    original = "w" in next(iter(kinds))
    tensors: dict[str, torch.Tensor] = {}
    layer_info = {}
    for name, parts in sorted(layers.items()):
        module = base_linear(model, name, directory)
        in_features, out_features = linear_shape(module)
        idx, values = parts["indices"], parts["w" if original else "delta"]
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise PacaError(
                f"{weights}: layer {name}: indices are {idx.dtype}, not integers; the file is "
                "damaged or not a PaCA adapter"
            )
        if not values.is_floating_point():
            raise PacaError(
                f"{weights}: layer {name}: values are {values.dtype}, not floating point; the "
                "file is damaged or not a PaCA adapter"
            )
        idx, values = idx.to(torch.long).reshape(-1), values.to(torch.float32)
        if (
            values.shape == (r, out_features)
            and values.shape != (out_features, r)
            and is_conv1d(module)
        ):
            values = values.t()  # Conv1D layout
        if idx.shape != (r,) or values.shape != (out_features, r):
            raise PacaError(
                f"{weights}: layer {name} has indices {tuple(idx.shape)} and values "
                f"{tuple(values.shape)}; expected ({r},) and ({out_features}, {r})"
            )
        problem = columns_problem(idx, values, in_features, out_features)
        if problem is not None:
            raise PacaError(
                f"{weights}: layer {name}: {problem}; the file is damaged or was not written "
                "by a PaCA implementation"
            )
        order = idx.argsort()  # paca keeps indices sorted; permute the values alike
        idx, values = idx[order], values[:, order]
        if original:
            values = values - _base_columns(model, name, idx).to(torch.float32) / scaling
        tensors[f"{name}.delta"] = values.contiguous()
        tensors[f"{name}.idx"] = idx.contiguous()
        layer_info[name] = {
            "in_features": in_features,
            "out_features": out_features,
            "r": r,
            "mode": "auto",
        }
    trainable = {}
    for name, state in saved.items():
        trainable[name] = sorted(state)
        tensors.update({f"{name}.{k}": v for k, v in state.items()})
    paca_config = PacaConfig(
        r=r,
        alpha=alpha,
        target_modules=sorted(layers),
        trainable_modules=sorted(saved),
    )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": paca_config.to_dict(),
        "layers": layer_info,
        "trainable_modules": trainable,
    }
    source = (
        "the PaCA authors' format (paca_w: absolute columns / scaling)"
        if original
        else ("the PEFT PaCA branch format (paca_delta)")
    )
    note = (
        f"paca: read {directory} as {source}: {len(layers)} layers, r={r}, alpha={alpha:g}"
        + (
            ", delta = paca_w - W0[:, idx] / scaling from the model's base weights"
            if original
            else ""
        )
        + (f", trained modules {sorted(saved)}" if saved else "")
    )
    return meta, tensors, note


def _alpha(config: dict, r: int, source: Path) -> float:
    """The config's ``paca_alpha``, else ``lora_alpha`` (the authors' fork), else ``r``: the first
    key present is used, so a zero or malformed value is refused rather than skipped."""
    key = next((k for k in ("paca_alpha", "lora_alpha") if config.get(k) is not None), None)
    if key is None:
        return float(r)
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise PacaError(
            f"{source} has {key}={value!r}; a PaCA adapter needs a finite number > 0 (the "
            "update is scaled by alpha / r)"
        )
    return float(value)


def _base_columns(model: nn.Module, name: str, idx: torch.Tensor) -> torch.Tensor:
    """``W0[:, idx]`` of layer ``name`` as ``(out, r)``, whatever adapters it carries."""
    module = model.get_submodule(name)
    if isinstance(module, PacaLinear):
        return module.base_cols_at(idx).detach().cpu()
    return read_cols(module, idx).cpu()
