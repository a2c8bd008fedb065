"""paca's own adapter format, and ``save_adapter`` / ``load_adapter`` for every format.

A directory with ``adapter_config.json`` and ``adapter.safetensors``. The weights file holds,
per adapted layer, ``<layer>.delta`` (``(out, r)``, fp32) and ``<layer>.idx`` (``(r,)``, int64),
and the full state of each module trained beside the adapters as ``<module>.<tensor>``. Nothing
else of the base model is stored. ``save_adapter(..., format="peft")`` writes PEFT's PaCA format
instead (``paca.adapters.peft_paca``); ``load_adapter`` also reads the foreign PaCA formats
(``paca.adapters.foreign``).

Imports: ``paca.model`` (the lifecycle), ``paca.adapters.common``, ``.foreign``, ``.peft_paca``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from paca.adapters import foreign, peft_paca
from paca.adapters.common import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FORMAT,
    FORMAT_VERSION,
    PEFT_WEIGHTS,
    atomic_file,
    base_model_name,
    cpu_tensors,
)
from paca.base_layer import linear_shape
from paca.config import PacaConfig
from paca.errors import PacaError
from paca.layer import columns_problem
from paca.model import (
    active_adapter,
    adapter_copies,
    adapter_layers,
    adapter_names,
    add_adapter_config,
    base_linear,
    check_finite,
    delete_adapter,
    enable_config,
    get_config,
    is_enabled,
    resolve_adapter,
    unload,
)

FORMATS = ("paca", "peft")


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    format: str = "paca",
    *,
    allow_non_finite: bool = False,
) -> Path:
    """Writes one adapter of ``model`` (default: the active one) into directory ``path``.

    The directory is created if needed. Files are written under temporary names and moved into
    place, so an interrupted save never leaves a half-written adapter behind.

    Args:
        model (nn.Module): an adapted model.
        path: the directory.
        adapter_name (str | None): which adapter (default: the active one).
        format (str): ``"paca"`` (default; reads back with every paca feature) or ``"peft"``
            (PEFT's own PaCA format, ``peft>=0.22``: ``PeftModel.from_pretrained(base, path)``).
        allow_non_finite (bool): write an adapter holding NaN or inf instead of refusing it.
            ``paca.Trainer``'s checkpoints do, so a run whose loss went NaN behaves as under
            the plain Trainer; anything meant to be used (a final adapter, an export) refuses.

    Returns:
        Path: the directory.

    Raises:
        PacaError: no such adapter, NaN/inf in it, ``path`` is a file, or (``"peft"``) what
            PEFT's format cannot hold; nothing is written then.
        WriteError: the disk refused the write; files already there are unchanged.
    """
    if format not in FORMATS:
        raise PacaError(f"format={format!r} is unknown; choose one of {', '.join(FORMATS)}")
    adapter_name = resolve_adapter(model, adapter_name, "save")
    if not allow_non_finite:
        check_finite(model, adapter_name, "save")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise PacaError(
            f"adapter path {directory} exists and is not a directory; choose another path"
        )
    if format == "peft":
        files = peft_paca.build(model, adapter_name)
    else:
        files = _build(model, adapter_name)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PacaError(f"cannot create adapter directory {directory}: {exc.strerror}") from exc
    tensors, meta, weights_name = files
    with atomic_file(directory / weights_name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt" if format == "peft" else FORMAT})
    with atomic_file(directory / ADAPTER_CONFIG) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def _build(model: nn.Module, adapter_name: str) -> tuple[dict, dict, str]:
    """paca's own files for one adapter: (tensors, config JSON, weights file name)."""
    config: PacaConfig = get_config(model, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    layer_info = {}
    for name, layer, adapter in adapter_layers(model, adapter_name):
        tensors |= cpu_tensors({"delta": adapter.delta, "idx": adapter.idx}, prefix=f"{name}.")
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
        tensors |= cpu_tensors(state, prefix=f"{name}.")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "paca_version": _paca_version(),
        "base_model_name_or_path": base_model_name(model),
        "adapter_name": adapter_name,
        "config": config.to_dict(),
        "layers": layer_info,
        "trainable_modules": trained,
    }
    return tensors, meta, ADAPTER_WEIGHTS


def _paca_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("paca")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise PacaError(f"{file} not found; is {directory} a paca adapter directory?")
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PacaError(f"{config_file} is not valid JSON ({exc}); save the adapter again") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PacaError(f'{config_file} is not a paca adapter config (no "format": "{FORMAT}")')
    if meta.get("format_version") != FORMAT_VERSION:
        raise PacaError(
            f"{config_file} has format_version={meta.get('format_version')!r}; this paca reads "
            f"version {FORMAT_VERSION} (upgrade paca to read newer adapters)"
        )
    for key in ("config", "layers", "trainable_modules"):
        if not isinstance(meta.get(key), dict):
            raise PacaError(f"{config_file} lacks a valid {key!r} entry; save the adapter again")
    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise PacaError(
            f"{weights_file} is corrupted or truncated ({exc}); save the adapter again"
        ) from exc
    return meta, tensors


def _check(
    model: nn.Module,
    meta: dict,
    tensors: dict[str, torch.Tensor],
    source: Path,
    replacing: str | None,
    weights_file: Path,
) -> None:
    """Every check that can fail, before the model is touched."""
    config = meta["config"]
    r = config.get("r")
    expected = set()
    for name, info in meta["layers"].items():
        expected |= {f"{name}.delta", f"{name}.idx"}
        delta, idx = tensors.get(f"{name}.delta"), tensors.get(f"{name}.idx")
        if delta is None or idx is None:
            raise PacaError(
                f"{source}: tensors of layer {name} are missing; save the adapter again"
            )
        shape = linear_shape(base_linear(model, name, source))
        if shape != (info["in_features"], info["out_features"]):
            raise PacaError(
                f"adapter layer {name} from {source} is (in={info['in_features']}, "
                f"out={info['out_features']}) but the model's is (in={shape[0]}, out={shape[1]}); "
                "was the adapter trained on another model?"
            )
        problem = columns_problem(idx, delta, *shape)
        if problem is not None:
            raise PacaError(
                f"{weights_file}: layer {name}: {problem}; the file is damaged or was not "
                "written by paca: save the adapter again"
            )
        if idx.shape != (r,):
            raise PacaError(
                f"{source}: layer {name} has {idx.numel()} columns but the config says r={r}; "
                "the adapter files do not belong together: save the adapter again"
            )
    for name, keys in meta["trainable_modules"].items():
        expected |= {f"{name}.{k}" for k in keys}
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise PacaError(
                f"trainable module {name} from {source} does not exist in the model"
            ) from None
        module = getattr(module, "original", module)
        state = module.state_dict()
        if sorted(state) != sorted(keys):
            raise PacaError(
                f"trainable module {name} from {source} has other tensors than the model's"
            )
        for key in keys:
            value = tensors[f"{name}.{key}"]
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise PacaError(
                    f"{weights_file}: trainable module {name}.{key} holds NaN or inf; the file "
                    "is damaged: save the adapter again"
                )
            if value.shape != state[key].shape:
                raise PacaError(
                    f"trainable module {name}.{key} from {source} has shape "
                    f"{tuple(value.shape)}, "
                    f"the model's {tuple(state[key].shape)}"
                )
    unexpected, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if unexpected or missing:
        raise PacaError(
            f"{source}: unexpected tensors {unexpected[:5]}, missing tensors {missing[:5]}"
        )
    if replacing is not None:
        layers = {name: adapter for name, _, adapter in adapter_layers(model, replacing)}
        have, want = set(layers), set(meta["layers"])
        if have != want:
            raise PacaError(
                f"the layers of adapter {replacing!r} differ from {source}: only in the model "
                f"{sorted(have - want)[:5]}, only in the file {sorted(want - have)[:5]}"
            )
        for name in want:
            if layers[name].r != r:
                raise PacaError(f"{name} has r={layers[name].r} in the model, r={r} in {source}")
        if {n for n, _ in adapter_copies(model, replacing)} != set(meta["trainable_modules"]):
            raise PacaError(f"the trained modules of adapter {replacing!r} differ from {source}")


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    device: str | None = None,
) -> nn.Module:
    """Loads an adapter saved by ``save_adapter``, or a PaCA adapter in another format.

    Besides paca's own files, it reads PEFT's PaCA format (``peft_type: "PACA"``, also what
    ``save_adapter(format="peft")`` writes) and the PaCA authors' format, converts them and
    logs what it did (see ``paca.adapters.foreign``).

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

    Raises:
        PacaError: a missing, damaged or mismatching adapter (the model is unchanged).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise PacaError(
            f"adapter directory {directory} not found; pass the folder save_adapter wrote"
        )
    if foreign.is_foreign(directory):
        meta, tensors, note = foreign.read(directory, model)
        foreign.logger.warning(note)
        weights_file = directory / PEFT_WEIGHTS
    else:
        meta, tensors = _read(directory)
        weights_file = directory / ADAPTER_WEIGHTS
    try:
        config = PacaConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise PacaError(f"{directory / ADAPTER_CONFIG}: {exc}") from exc
    config = dataclasses.replace(config, device=device or "auto")
    fresh = not is_enabled(model)
    if fresh:
        action, name = "enable", adapter_name or "default"
    elif adapter_name is None or adapter_name in adapter_names(model):
        action, name = "replace", adapter_name or active_adapter(model)
    else:
        action, name = "add", adapter_name
    replacing = name if action == "replace" else None
    _check(model, meta, tensors, directory, replacing, weights_file)
    indices = {layer: tensors[f"{layer}.idx"] for layer in meta["layers"]}
    targets = list(meta["layers"])
    if action == "enable":
        enable_config(model, config, adapter_name=name, targets=targets, indices=indices)
    elif action == "add":
        add_adapter_config(model, name, config, targets=targets, indices=indices)
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
