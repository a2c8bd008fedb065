"""Adapter files: ``adapter_config.json`` plus ``adapter.safetensors`` in one directory.

The weights file holds, per adapted layer, ``<layer>.delta`` (``(out, r)``, fp32) and
``<layer>.idx`` (``(r,)``, int64), and the full state of each module trained beside the
adapters as ``<module>.<tensor>``. Nothing else of the base model is stored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from paca import interop
from paca.config import PacaConfig
from paca.layer import linear_shape
from paca.model import (
    _ACTIVE_ATTR,
    _CONFIGS_ATTR,
    _add_adapter,
    _enable,
    adapter_copies,
    adapter_layers,
    adapter_names,
    base_linear,
    delete_adapter,
    is_enabled,
    resolve_adapter,
    unload,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
FORMAT = "paca"
FORMAT_VERSION = 1


def _base_model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def save_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None
) -> Path:
    """Writes one adapter of ``model`` (default: the active one) into directory ``path``.

    The directory is created if needed. Files are written under temporary names and moved into
    place, so an interrupted save never leaves a half-written adapter behind.

    Returns:
        Path: the directory.
    """
    adapter_name = resolve_adapter(model, adapter_name, "save")
    config: PacaConfig = getattr(model, _CONFIGS_ATTR)[adapter_name]
    tensors: dict[str, torch.Tensor] = {}
    layer_info = {}
    for name, layer, adapter in adapter_layers(model, adapter_name):
        tensors[f"{name}.delta"] = adapter.delta.detach().to("cpu").contiguous()
        tensors[f"{name}.idx"] = adapter.idx.detach().to("cpu").contiguous()
        layer_info[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "r": adapter.r,
            "mode": layer.mode,
        }
    trained = {}
    for name, module in adapter_copies(model, adapter_name):
        state = module.state_dict()
        trained[name] = sorted(state)
        for key, value in state.items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "paca_version": _paca_version(),
        "base_model_name_or_path": _base_model_name(model),
        "adapter_name": adapter_name,
        "config": config.to_dict(),
        "layers": layer_info,
        "trainable_modules": trained,
    }
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(
            f"adapter path {directory} exists and is not a directory; choose another path"
        )
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        directory / ADAPTER_WEIGHTS,
        lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}),
    )
    _atomic_write(
        directory / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n")
    )
    return directory


def _paca_version() -> str:
    from paca import __version__

    return __version__


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found; is {directory} a paca adapter directory?")
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{config_file} is not valid JSON ({exc}); save the adapter again"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f'{config_file} is not a paca adapter config (no "format": "{FORMAT}")')
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_file} has format_version={meta.get('format_version')!r}; this paca reads "
            f"version {FORMAT_VERSION} (upgrade paca to read newer adapters)"
        )
    for key in ("config", "layers", "trainable_modules"):
        if not isinstance(meta.get(key), dict):
            raise ValueError(f"{config_file} lacks a valid {key!r} entry; save the adapter again")
    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(
            f"{weights_file} is corrupted or truncated ({exc}); save the adapter again"
        ) from exc
    return meta, tensors


def _check(
    model: nn.Module,
    meta: dict,
    tensors: dict[str, torch.Tensor],
    source: Path,
    replacing: str | None,
) -> None:
    """Every check that can fail, before the model is touched."""
    config = meta["config"]
    r = config.get("r")
    expected = set()
    for name, info in meta["layers"].items():
        expected |= {f"{name}.delta", f"{name}.idx"}
        delta, idx = tensors.get(f"{name}.delta"), tensors.get(f"{name}.idx")
        if delta is None or idx is None:
            raise ValueError(
                f"{source}: tensors of layer {name} are missing; save the adapter again"
            )
        if (
            delta.shape != (info["out_features"], r)
            or idx.shape != (r,)
            or idx.dtype != torch.int64
        ):
            raise ValueError(
                f"{source}: layer {name} has delta {tuple(delta.shape)}, idx {tuple(idx.shape)} "
                f"{idx.dtype}; expected ({info['out_features']}, {r}) and ({r},) int64"
            )
        shape = linear_shape(base_linear(model, name, source))
        if shape != (info["in_features"], info["out_features"]):
            raise ValueError(
                f"adapter layer {name} from {source} is (in={info['in_features']}, "
                f"out={info['out_features']}) but the model's is (in={shape[0]}, out={shape[1]}); "
                "was the adapter trained on another model?"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= shape[0]):
            raise ValueError(f"{source}: indices of layer {name} fall outside 0..{shape[0] - 1}")
    for name, keys in meta["trainable_modules"].items():
        expected |= {f"{name}.{k}" for k in keys}
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"trainable module {name} from {source} does not exist in the model"
            ) from None
        module = getattr(module, "original", module)
        state = module.state_dict()
        if sorted(state) != sorted(keys):
            raise ValueError(
                f"trainable module {name} from {source} has other tensors than the model's"
            )
        for key in keys:
            if tensors[f"{name}.{key}"].shape != state[key].shape:
                raise ValueError(
                    f"trainable module {name}.{key} from {source} has shape "
                    f"{tuple(tensors[f'{name}.{key}'].shape)}, "
                    f"the model's {tuple(state[key].shape)}"
                )
    unexpected, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if unexpected or missing:
        raise ValueError(
            f"{source}: unexpected tensors {unexpected[:5]}, missing tensors {missing[:5]}"
        )
    if replacing is not None:
        layers = {name: adapter for name, _, adapter in adapter_layers(model, replacing)}
        have, want = set(layers), set(meta["layers"])
        if have != want:
            raise ValueError(
                f"the layers of adapter {replacing!r} differ from {source}: only in the model "
                f"{sorted(have - want)[:5]}, only in the file {sorted(want - have)[:5]}"
            )
        for name in want:
            if layers[name].r != r:
                raise ValueError(f"{name} has r={layers[name].r} in the model, r={r} in {source}")
        if {n for n, _ in adapter_copies(model, replacing)} != set(meta["trainable_modules"]):
            raise ValueError(f"the trained modules of adapter {replacing!r} differ from {source}")


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    device: str | None = None,
) -> nn.Module:
    """Loads an adapter saved by ``save_adapter``, or a PaCA adapter in another format.

    Besides paca's own files, it reads the PEFT PaCA branch format and the PaCA authors'
    format (``adapter_config.json`` with ``peft_type: "PACA"``), converts them and logs what
    it did (see ``paca.interop.read_foreign``).

    * On a model without PaCA: adapts it with the saved settings and column indices (no RNG is
      used, so the outputs are those of the saved model); the adapter is named ``adapter_name``
      (default ``"default"``) and active.
    * On an adapted model, with ``adapter_name`` ``None`` or an existing name: replaces the
      values of that adapter (default: the active one); its layers and shapes must match.
    * With a new ``adapter_name``: adds the adapter beside the others, not active
      (``paca.set_adapter`` switches).

    Every check runs before the model is touched.

    Args:
        model (nn.Module): the base model (or a model adapted the same way).
        path: the adapter directory.
        adapter_name (str | None): see above.
        device (str | None): overrides the saved ``device`` setting (default: ``"auto"``);
            only used when the model has no PaCA yet.

    Returns:
        nn.Module: the same model object.
    """
    directory = Path(path)
    if interop.is_foreign(directory):
        meta, tensors, note = interop.read_foreign(directory, model)
        interop.logger.warning(note)
    else:
        meta, tensors = _read(directory)
    try:
        config = PacaConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: {exc}") from exc
    config = dataclasses.replace(config, device=device or "auto")
    fresh = not is_enabled(model)
    if fresh:
        action, name = "enable", adapter_name or "default"
    elif adapter_name is None or adapter_name in adapter_names(model):
        action, name = "replace", adapter_name or getattr(model, _ACTIVE_ATTR)
    else:
        action, name = "add", adapter_name
    _check(model, meta, tensors, directory, replacing=name if action == "replace" else None)
    indices = {layer: tensors[f"{layer}.idx"] for layer in meta["layers"]}
    if action == "enable":
        _enable(model, config, targets=list(meta["layers"]), indices=indices, adapter_name=name)
    elif action == "add":
        _add_adapter(model, name, config, targets=list(meta["layers"]), indices=indices)
    try:
        for layer_name, layer, adapter in adapter_layers(model, name):
            idx = tensors[f"{layer_name}.idx"].to(adapter.idx.device)
            delta = tensors[f"{layer_name}.delta"].to(adapter.delta.device, adapter.delta.dtype)
            layer.set_columns(idx, delta, name)
        for module_name, module in adapter_copies(model, name):
            state = {
                k: tensors[f"{module_name}.{k}"] for k in meta["trainable_modules"][module_name]
            }
            module.load_state_dict(state)
    except BaseException:
        if action == "enable":
            unload(model)
        elif action == "add":
            delete_adapter(model, name)
        raise
    return model
