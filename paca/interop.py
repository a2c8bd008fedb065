"""Adapter interop: export to a standard PEFT LoRA adapter, read other PaCA formats.

A PaCA update touches ``r`` input columns, so it is exactly a rank-``r`` LoRA update:
``A`` (``r x in``) holds one-hot rows selecting ``idx`` and ``B = scaling * delta``
(``out x r``); with ``lora_alpha = r`` PEFT's scaling is 1 and ``B @ A`` is the PaCA update, with
no SVD and no approximation.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from paca.layer import PacaLinear, is_conv1d, linear_shape

logger = logging.getLogger("paca")

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def export_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    force: bool = False,
) -> Path:
    """Writes one PaCA adapter of ``model`` as a PEFT LoRA adapter folder.

    ``peft.PeftModel.from_pretrained(base_model, path)`` then computes what the PaCA model
    computes (up to float rounding of the two GEMMs), and anything that serves PEFT LoRA
    adapters (vLLM, TGI, LoRAX, PEFT itself) can serve it.

    Args:
        model (nn.Module): an adapted model.
        path: the output folder; it must not exist unless ``force``.
        adapter_name (str | None): which adapter (default: the active one).
        force (bool): replace an existing folder.

    Returns:
        Path: the folder.
    """
    from paca.model import adapter_copies, adapter_layers, resolve_adapter

    adapter_name = resolve_adapter(model, adapter_name, "export")
    target = Path(path)
    if target.exists() and not force:
        raise FileExistsError(
            f"{target} exists; choose another output or pass force=True (--force)"
        )
    tensors: dict[str, torch.Tensor] = {}
    targets, conv1d = [], []
    r = None
    for name, layer, adapter in adapter_layers(model, adapter_name):
        r = adapter.r
        delta = adapter.delta.detach().to("cpu")
        selector = torch.zeros(adapter.r, layer.in_features, dtype=delta.dtype)  # A: one-hot rows
        selector[torch.arange(adapter.r), adapter.idx.cpu()] = 1.0
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = selector
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = (adapter.scaling * delta).contiguous()
        targets.append(name)
        conv1d.append(layer.transposed)
    if any(conv1d) and not all(conv1d):
        raise ValueError(
            "this adapter spans nn.Linear and Conv1D layers; PEFT's fan_in_fan_out is one setting "
            "per adapter, so export it in two parts (two PaCA adapters with separate targets)"
        )
    saved_modules = []
    for name, wrapper in adapter_copies(model, adapter_name):
        saved_modules.append(name)
        for key, value in wrapper.state_dict().items():
            tensors[f"{_PEFT_PREFIX}{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "r": r,
        # PEFT scales B @ A by lora_alpha / r: 1 here, since B already carries PaCA's scaling
        "lora_alpha": r,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "fan_in_fan_out": bool(conv1d and conv1d[0]),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": saved_modules or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save_file(tensors, str(staging / PEFT_WEIGHTS), metadata={"format": "pt"})
        (staging / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


# -- reading other PaCA formats -------------------------------------------------------------------

_FOREIGN_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.paca_(?P<kind>delta|w|indices)(?:\.(?:default|weight))?$"
)


def is_foreign(directory: Path) -> bool:
    """Whether ``directory`` holds a PEFT-style PaCA adapter (``peft_type: "PACA"``)."""
    config = directory / PEFT_CONFIG
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and str(data.get("peft_type", "")).upper() == "PACA"


def read_foreign(directory: Path, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor], str]:
    """Converts a PEFT PaCA branch or original-authors adapter into paca's own format.

    Both store ``r``, an alpha (``paca_alpha``, else ``lora_alpha``, else ``r``) and per layer
    ``paca_indices``. The PEFT branch stores ``paca_delta``, which is paca's ``delta`` (the
    update of the columns is ``(alpha / r) * delta``). The authors' code stores ``paca_w``, the
    trained columns themselves divided by the scaling, so
    ``delta = paca_w - W0[:, idx] / scaling``: that needs the base weights of ``model``.

    Returns:
        (meta, tensors, note): what ``paca.checkpoint`` reads, and a sentence on what was done.
    """
    from paca.checkpoint import FORMAT, FORMAT_VERSION
    from paca.config import PacaConfig
    from paca.model import base_linear

    config = json.loads((directory / PEFT_CONFIG).read_text())
    weights = directory / PEFT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (only safetensors PaCA adapters are read)")
    try:
        raw = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{weights} is corrupted or truncated ({exc})") from exc
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"{directory / PEFT_CONFIG} has r={r!r}; a PaCA adapter needs r >= 1")
    alpha = float(config.get("paca_alpha") or config.get("lora_alpha") or r)
    scaling = alpha / r
    layers: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    modules_to_save = config.get("modules_to_save") or []
    for key, value in raw.items():
        match = _FOREIGN_KEY.match(key)
        if match:
            layers.setdefault(match["module"], {})[match["kind"]] = value
            continue
        plain = key.removeprefix(_PEFT_PREFIX)
        owner = next((m for m in modules_to_save if plain.startswith(m + ".")), None)
        if owner is None:
            raise ValueError(
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
        raise ValueError(
            f"{weights}: expected paca_delta or paca_w with paca_indices for every layer"
        )
    original = "w" in next(iter(kinds))
    tensors: dict[str, torch.Tensor] = {}
    layer_info = {}
    for name, parts in sorted(layers.items()):
        module = base_linear(model, name, directory)
        in_features, out_features = linear_shape(module)
        idx = parts["indices"].to(torch.long).reshape(-1)
        values = parts["w" if original else "delta"].to(torch.float32)
        if (
            values.shape == (r, out_features)
            and values.shape != (out_features, r)
            and is_conv1d(module)
        ):
            values = values.t()  # Conv1D layout
        if idx.shape != (r,) or values.shape != (out_features, r):
            raise ValueError(
                f"{weights}: layer {name} has indices {tuple(idx.shape)} and values "
                f"{tuple(values.shape)}; expected ({r},) and ({out_features}, {r})"
            )
        if int(idx.min()) < 0 or int(idx.max()) >= in_features or idx.unique().numel() != r:
            raise ValueError(
                f"{weights}: indices of {name} are not {r} distinct columns in 0..{in_features - 1}"
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


def _base_columns(model: nn.Module, name: str, idx: torch.Tensor) -> torch.Tensor:
    """``W0[:, idx]`` of layer ``name`` as ``(out, r)``, whatever adapters it carries."""
    module = model.get_submodule(name)
    if isinstance(module, PacaLinear):
        return module._base_cols_at(idx.to(module.weight.device)).detach().cpu()
    weight = module.weight.detach()
    idx = idx.to(weight.device)
    cols = weight.index_select(0, idx).t() if is_conv1d(module) else weight.index_select(1, idx)
    return cols.cpu()
