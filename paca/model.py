"""The lifecycle of PaCA on a model: enable, add/set/delete adapters, merge, unload, disable,
and ``sync_weights``.

Which layers are adapted is ``paca.targets``' to say, how columns are chosen
``paca.selection``'s, the per-layer math ``paca.layer``'s; the model-level state is one
``paca.state.PacaState``. Every mutating call checks everything before it changes anything.

Imports: ``paca.layer``, ``paca.targets``, ``paca.selection``, ``paca.state``, ``paca.quant``,
``paca.backends``, ``paca.dropbp`` (removed with the adapters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from paca import backends, dropbp, quant
from paca import state as paca_state
from paca.base_layer import describe, is_linear, is_quantized, layer_device, linear_shape
from paca.config import PacaConfig
from paca.errors import PacaError
from paca.layer import PacaAdapter, PacaLinear, TrainedCopy, columns_problem, write_columns
from paca.selection import STRATEGIES, column_scores, get_strategy, select_columns
from paca.state import PacaState
from paca.targets import find_targets, resolve_trainable


def paca_layers(model: nn.Module) -> list[tuple[str, PacaLinear]]:
    """``(name, layer)`` of every adapted layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PacaLinear)]


def _trained_copies(model: nn.Module) -> list[tuple[str, TrainedCopy]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TrainedCopy)]


def adapter_layers(
    model: nn.Module, adapter_name: str
) -> list[tuple[str, PacaLinear, PacaAdapter]]:
    """``(name, layer, adapter)`` of every layer carrying adapter ``adapter_name``."""
    return [
        (n, layer, layer.adapters[adapter_name])
        for n, layer in paca_layers(model)
        if adapter_name in layer.adapters
    ]


def adapter_copies(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules trained in full for adapter ``adapter_name``."""
    return [
        (n, w.copies[adapter_name]) for n, w in _trained_copies(model) if adapter_name in w.copies
    ]


def base_linear(model: nn.Module, name: str, source: object) -> nn.Module:
    """The linear layer ``name`` of the base model (inside its PaCA wrapper, if any), or an
    error naming the adapter file ``source`` it was asked for."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise PacaError(
            f"adapter layer {name} from {source} does not exist in {type(model).__name__}; "
            "was the adapter trained on another model?"
        ) from None
    module = module.base_layer if isinstance(module, PacaLinear) else module
    if not is_linear(module):
        raise PacaError(
            f"adapter layer {name} from {source} is a {type(module).__name__} in this model"
        )
    return module


def is_enabled(model: nn.Module) -> bool:
    return any(isinstance(m, (PacaLinear, TrainedCopy)) for m in model.modules())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _model_devices(model: nn.Module) -> set[torch.device]:
    """Devices of the model's tensors, without ``meta`` (weights accelerate offloads)."""
    tensors = [*model.parameters(), *model.buffers()]
    return {t.device for t in tensors if not t.is_meta}


def _offloaded(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _execution_devices(model: nn.Module) -> set[torch.device]:
    """Where accelerate's hooks run the model's layers (their ``execution_device``), with the
    index written out (``cuda`` is ``cuda:0``) so devices compare equal however they were given."""
    found = set()
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            device = getattr(h, "execution_device", None)
            if device is not None:
                found.add(_indexed(torch.device(device)))
    return found


def _indexed(device: torch.device) -> torch.device:
    return (
        device if device.index is not None or device.type == "cpu" else torch.device(device.type, 0)
    )


def _check_trainable(model: nn.Module, trainable: list[str]) -> None:
    """A module trained in full needs real weights: an offloaded one (on meta) cannot train."""
    for name in trainable:
        if _offloaded(model.get_submodule(name)):
            raise PacaError(
                f"trainable module {name} is offloaded by accelerate (its weights are on the "
                f"meta device), so it cannot be trained in full; keep it on a device "
                f"(device_map={{{name!r}: 'cpu'}} or a GPU) or pass trainable_modules=[]"
            )


@dataclass
class _Plan:
    name: str
    module: nn.Module
    idx: torch.Tensor
    mode: str


def _plan(
    model: nn.Module,
    config: PacaConfig,
    trainable: list[str],
    targets: list[str] | None,
    indices: dict[str, torch.Tensor] | None,
    calibration=None,
) -> tuple[list[_Plan], dict | None]:
    """Checks every target before anything changes (enable is all or nothing); returns the
    plan and the calibration report of a calibrated selection."""
    names = targets if targets is not None else find_targets(model, config, trainable)
    scores, report = {}, None
    if indices is None:
        scores, report = _selection_scores(model, names, config, calibration)
    plans = []
    hooked = []
    for name in names:
        module = model.get_submodule(name)
        existing = module if isinstance(module, PacaLinear) else None
        module = existing.base_layer if existing is not None else module
        info = describe(module)
        if config.r > info.in_features:
            raise PacaError(
                f"r={config.r} exceeds in_features={info.in_features} of {name}; choose "
                f"r <= {info.in_features} or exclude that layer with exclude_modules=[{name!r}]"
            )
        reason = info.merged_unsupported
        if config.mode == "merged" and reason is not None and existing is None:
            raise PacaError(
                f"mode='merged' cannot adapt {name}: {reason}; use mode='additive' or mode='auto'"
            )
        if existing is not None:
            mode = existing.mode  # a layer's adapters share one mode
        elif config.mode == "auto":
            mode = "merged" if reason is None and not info.hooked else "additive"
        else:
            mode = config.mode
        if existing is None and mode == "merged" and info.hooked:
            hooked.append(name)
        if indices is not None:
            idx = indices[name]
        else:
            idx = select_columns(
                info.in_features,
                config.r,
                strategy=config.selection,
                seed=config.seed,
                name=name,
                scores=scores.get(name),
            )
        plans.append(_Plan(name, module, idx, mode))
    if hooked:
        warnings.warn(
            f"mode='merged' bypasses the forward hooks registered on {hooked[:5]}"
            f"{' ...' if len(hooked) > 5 else ''}; use mode='additive' to keep them",
            UserWarning,
            stacklevel=4,
        )
    return plans, report


def _selection_scores(model, names, config: PacaConfig, calibration) -> tuple[dict, dict | None]:
    """Column scores for a score-based selection (run before anything changes)."""
    strategy = get_strategy(config.selection)
    if strategy.calibrated and calibration is None:
        raise PacaError(
            f"selection={config.selection!r} needs calibration batches: pass "
            "calibration=[batch, ...] (model inputs; with labels for 'gradient')"
        )
    if not strategy.calibrated and calibration is not None:
        calibrated = [s.name for s in STRATEGIES.values() if s.calibrated]
        raise PacaError(
            f"calibration= is used by selection={' or '.join(map(repr, calibrated))} only, "
            f"not {config.selection!r}; drop it or choose one of those"
        )
    if strategy.score is None:
        return {}, None
    for name in names:  # the error for a bad r comes before any calibration work
        module = model.get_submodule(name)
        module = module.base_layer if isinstance(module, PacaLinear) else module
        if config.r > linear_shape(module)[0]:
            return {}, None
    return column_scores(model, names, config.selection, calibration)


def _settings_to_config(config: PacaConfig | None, **settings) -> PacaConfig:
    settings["device"] = str(settings["device"])
    if config is None:
        return PacaConfig(**settings)
    defaults = PacaConfig()
    changed = [k for k, v in settings.items() if v != getattr(defaults, k)]
    if changed:
        raise PacaError(
            f"pass either config= or keyword settings, not both (got config and {changed})"
        )
    return config


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise PacaError(f"adapter_name={name!r} must be a non-empty string without dots")


def enable(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    target_modules: list[str] | str | None = None,
    exclude_modules: list[str] | str | None = None,
    selection: str = "random",
    seed: int = 0,
    device: str | torch.device = "auto",
    mode: str = "auto",
    *,
    trainable_modules: list[str] | None = None,
    config: PacaConfig | None = None,
    adapter_name: str = "default",
    calibration=None,
) -> nn.Module:
    """Adapts a model in place with PaCA and freezes everything but the adapters.

    Each targeted linear layer becomes a ``PacaLinear`` that trains ``r`` of its input columns.
    See ``PacaConfig`` for the meaning of every setting; pass either the settings or
    ``config=``, not both. Either the whole model is adapted or, on an error, nothing changes.
    More adapters go onto an adapted model with ``add_adapter``.

    Args:
        model (nn.Module): any PyTorch / Hugging Face model, also one whose weights accelerate
            offloads (``device_map`` with CPU/disk offload, ``cpu_offload``, ``disk_offload``):
            its offloaded layers are adapted in additive mode, on their execution device.
        adapter_name (str): name of this (active) adapter.
        calibration: batches of model inputs for ``selection="activation"`` or ``"gradient"``
            (a list or DataLoader; dicts of tensors, with labels for ``"gradient"``). The cost
            of the calibration is left in ``paca.get_state(model).calibration``.

    Returns:
        nn.Module: the same model object, adapted, on the resolved device.

    Raises:
        PacaError: a bad setting, target, device or calibration (the model is unchanged).
    """
    config = _settings_to_config(
        config,
        r=r,
        alpha=alpha,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        selection=selection,
        seed=seed,
        device=device,
        mode=mode,
        trainable_modules=trainable_modules,
    )
    return enable_config(model, config, adapter_name=adapter_name, calibration=calibration)


def enable_config(
    model: nn.Module,
    config: PacaConfig,
    *,
    adapter_name: str = "default",
    targets: list[str] | None = None,
    indices: dict[str, torch.Tensor] | None = None,
    calibration=None,
) -> nn.Module:
    """``enable`` from a config, optionally with the exact layers (``targets``) and columns
    (``indices``, ``{layer: (r,) int64}``) to use, as a saved adapter has them."""
    _check_adapter_name(adapter_name)
    if is_enabled(model):
        raise PacaError(
            f"{type(model).__name__} already has {len(paca_layers(model))} PaCA layers; call "
            "paca.unload(model) or paca.merge(model) first, paca.add_adapter(model, name, ...) "
            "for another adapter, or paca.load_adapter to replace this one"
        )
    trainable = resolve_trainable(model, config.trainable_modules)
    _check_trainable(model, trainable)
    config = dataclasses.replace(config, trainable_modules=trainable)
    plans, report = _plan(model, config, trainable, targets, indices, calibration)
    devices = _model_devices(model)
    current = next(iter(devices)) if len(devices) == 1 else None
    if (len(devices) > 1 or _offloaded(model)) and config.device == "auto":
        # a model spread over devices (device_map) or offloaded by accelerate stays where it is
        target_device = None
    else:
        target_device = backends.resolve_device(config.device, current)
        if _offloaded(model):
            runs_on = _execution_devices(model) | {_indexed(d) for d in devices}
            if runs_on != {_indexed(target_device)}:
                where = ", ".join(sorted(str(d) for d in runs_on)) or "an unknown device"
                raise PacaError(
                    f"device={config.device!r}: this model's weights are offloaded by "
                    f"accelerate (on the meta device, loaded per call onto {where}), so paca "
                    "cannot move it; pass device='auto' (or that device) to keep accelerate's "
                    "placement"
                )
            target_device = None  # it already runs there: nothing to move

    # Nothing has changed so far; from here on, undo everything on failure.
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    replaced: list[tuple[str, nn.Module]] = []
    try:
        if target_device is not None and devices != {target_device}:
            model.to(target_device)
        backends.load_for(_model_devices(model) | {layer_device(p.module) for p in plans})
        for param in model.parameters():
            param.requires_grad_(False)
        for plan in plans:
            layer = PacaLinear(plan.module, plan.idx, config.alpha, plan.mode, adapter_name)
            _set_submodule(model, plan.name, layer)
            replaced.append((plan.name, plan.module))
        for name in trainable:
            original = model.get_submodule(name)
            _set_submodule(model, name, TrainedCopy(original, adapter_name))
            replaced.append((name, original))
    except BaseException:
        for name, module in reversed(replaced):
            current_module = model.get_submodule(name)
            if isinstance(current_module, PacaLinear):
                current_module.release()
            _set_submodule(model, name, module)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        if target_device is not None and len(devices) == 1 and devices != {target_device}:
            model.to(next(iter(devices)))
        raise
    paca_state.attach(
        model,
        PacaState(
            configs={adapter_name: config},
            active=adapter_name,
            requires_grad=flags,
            calibration=report,
        ),
    )
    return model


def get_state(model: nn.Module) -> PacaState | None:
    """What paca keeps on ``model`` (configs, active adapter, calibration report), or
    ``None`` if it has no PaCA adapters."""
    return paca_state.get(model)


def _state(model: nn.Module, action: str) -> PacaState:
    state = paca_state.get(model)
    if state is None:
        raise PacaError(
            f"{type(model).__name__} has no PaCA adapters to {action}; call paca.enable first"
        )
    return state


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    state = paca_state.get(model)
    return list(state.configs) if state is not None else []


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter (``None`` on a model without PaCA)."""
    state = paca_state.get(model)
    return state.active if state is not None else None


def get_config(model: nn.Module, adapter_name: str | None = None) -> PacaConfig:
    """The settings of one adapter (default: the active one)."""
    return _state(model, "read").configs[resolve_adapter(model, adapter_name, "read")]


def resolve_adapter(model: nn.Module, adapter_name: str | None = None, action: str = "use") -> str:
    """``adapter_name`` (default: the active adapter), or an error saying why it cannot be
    ``action``-ed: no adapters at all, or no adapter of that name."""
    state = _state(model, action)
    name = adapter_name or state.active
    if name not in state.configs:
        raise PacaError(
            f"{type(model).__name__} has no adapter named {name!r}; it has {list(state.configs)}"
        )
    return name


def add_adapter(
    model: nn.Module,
    adapter_name: str,
    r: int = 8,
    alpha: float = 16,
    target_modules: list[str] | str | None = None,
    exclude_modules: list[str] | str | None = None,
    selection: str = "random",
    seed: int = 0,
    mode: str = "auto",
    *,
    trainable_modules: list[str] | None = None,
    config: PacaConfig | None = None,
    calibration=None,
) -> nn.Module:
    """Adds another named adapter to an adapted model; it is not made active.

    Settings as for ``enable`` (the device is the model's). A layer that already carries
    adapters keeps its execution mode. Switch with ``set_adapter``.

    Raises:
        PacaError: no PaCA on the model yet, the name is taken, or a bad setting.
    """
    config = _settings_to_config(
        config,
        r=r,
        alpha=alpha,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        selection=selection,
        seed=seed,
        device="auto",
        mode=mode,
        trainable_modules=trainable_modules,
    )
    return add_adapter_config(model, adapter_name, config, calibration=calibration)


def add_adapter_config(
    model: nn.Module,
    adapter_name: str,
    config: PacaConfig,
    *,
    targets: list[str] | None = None,
    indices: dict[str, torch.Tensor] | None = None,
    calibration=None,
) -> nn.Module:
    """``add_adapter`` from a config, optionally with exact ``targets`` and ``indices`` (see
    ``enable_config``)."""
    _check_adapter_name(adapter_name)
    if not is_enabled(model):
        raise PacaError(f"{type(model).__name__} has no PaCA adapters; call paca.enable first")
    state = _state(model, "add to")
    if adapter_name in state.configs:
        raise PacaError(f"{type(model).__name__} already has an adapter named {adapter_name!r}")
    trainable = resolve_trainable(model, config.trainable_modules)
    _check_trainable(model, trainable)
    config = dataclasses.replace(config, trainable_modules=trainable)
    plans, _ = _plan(model, config, trainable, targets, indices, calibration)
    added: list[tuple[str, nn.Module]] = []  # (name, module to put back, or None)
    try:
        for plan in plans:
            current = model.get_submodule(plan.name)
            if isinstance(current, PacaLinear):
                current.add_adapter(adapter_name, plan.idx, config.alpha)
                added.append((plan.name, None))
            else:
                layer = PacaLinear(plan.module, plan.idx, config.alpha, plan.mode, adapter_name)
                layer.set_adapter(state.active)
                _set_submodule(model, plan.name, layer)
                added.append((plan.name, plan.module))
        for name in trainable:
            current = model.get_submodule(name)
            if isinstance(current, TrainedCopy):
                current.add_adapter(adapter_name)
                added.append((name, None))
            else:
                wrapper = TrainedCopy(current, adapter_name)
                wrapper.set_adapter(state.active)
                _set_submodule(model, name, wrapper)
                added.append((name, current))
    except BaseException:
        for name, original in reversed(added):
            if original is not None:
                _set_submodule(model, name, original)
            else:
                model.get_submodule(name).delete_adapter(adapter_name)
        raise
    state.configs[adapter_name] = config
    return model


def _switches(model: nn.Module) -> list[tuple[str, PacaLinear | TrainedCopy]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (PacaLinear, TrainedCopy))]


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Makes ``adapter_name`` the active (computing and trainable) adapter of every layer."""
    resolve_adapter(model, adapter_name, "switch")
    for _, module in _switches(model):
        module.set_adapter(adapter_name)
    _state(model, "switch").active = adapter_name
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Removes one adapter. Deleting the active one switches to the first remaining adapter
    (with a warning); the last one is removed with ``paca.unload`` or folded with ``paca.merge``.
    """
    resolve_adapter(model, adapter_name, "delete")
    state = _state(model, "delete")
    remaining = [n for n in state.configs if n != adapter_name]
    if not remaining:
        raise PacaError(
            f"{adapter_name!r} is the model's only adapter; use paca.unload(model) to remove it "
            "or paca.merge(model) to fold it into the weights"
        )
    if state.active == adapter_name:
        warnings.warn(
            f"deleting the active adapter {adapter_name!r}; {remaining[0]!r} is active now",
            UserWarning,
            stacklevel=2,
        )
        set_adapter(model, remaining[0])
    for name, module in _switches(model):
        holder = module.adapters if isinstance(module, PacaLinear) else module.copies
        if adapter_name not in holder:
            continue
        module.delete_adapter(adapter_name)
        if not holder:  # no adapter left on this module: give back the base module
            base = module.release() if isinstance(module, PacaLinear) else module.original
            _set_submodule(model, name, base)
    del state.configs[adapter_name]
    return model


def _finish(model: nn.Module, keep_trained: bool) -> nn.Module:
    """Swaps every PaCA module for its base module (for a module trained in full: its trained
    copy if ``keep_trained``), gives back the ``requires_grad`` flags and drops paca's state."""
    for name, layer in paca_layers(model):
        _set_submodule(model, name, layer.release())
    for name, wrapper in _trained_copies(model):
        keep = wrapper.original
        if keep_trained and wrapper.active_adapter is not None:
            keep = wrapper.trained
        _set_submodule(model, name, keep)
    state = paca_state.get(model)
    flags = state.requires_grad if state is not None else {}
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    paca_state.detach(model)
    dropbp.remove_drop_backward(model)
    return model


def _require_adapters(model: nn.Module, action: str) -> bool:
    if is_enabled(model):
        return True
    warnings.warn(
        f"{type(model).__name__} has no PaCA adapters; nothing to {action}",
        UserWarning,
        stacklevel=3,
    )
    return False


def check_finite(model: nn.Module, adapter_name: str | None = None, action: str = "write") -> None:
    """Refuses an invalid adapter (NaN or inf in it, above all) before anything is written or
    merged: the writers' side of ``paca.layer.columns_problem``, which every reader applies to
    the files.

    Raises:
        PacaError: names the first layer whose ``delta`` or indices are invalid.
    """
    name = resolve_adapter(model, adapter_name, action)
    for layer_name, layer, adapter in adapter_layers(model, name):
        problem = columns_problem(
            adapter.idx, adapter.delta.detach(), layer.in_features, layer.out_features
        )
        if problem is not None:
            raise PacaError(
                f"{layer_name}: {problem}; refusing to {action} adapter {name!r} (nothing was "
                "changed). Resume from an earlier checkpoint or lower the learning rate"
            )
    for module_name, module in adapter_copies(model, name):
        for key, value in module.state_dict().items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise PacaError(
                    f"{module_name}.{key} (trained in full) holds NaN or inf; refusing to "
                    f"{action} adapter {name!r} (nothing was changed). Resume from an earlier "
                    "checkpoint or lower the learning rate"
                )


def merge(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Folds the active adapter into the weights; returns the model made of plain layers again.

    Safe: an adapter holding NaN or inf is refused before any weight is touched. Modules trained
    in full (``trainable_modules``) keep their trained weights. Other adapters are dropped (with
    a warning naming them). Calling it on a model without adapters warns and does nothing.

    Quantized or forward-only base layers (QPaCA) are merged into a dequantized copy: each adapted
    layer becomes a plain ``nn.Linear`` in ``dtype`` (default: the dtype of most of the model's
    other floating-point weights, so the layer fits its neighbours; the layer's compute dtype if
    there are none) holding the dequantized weight with the trained columns, so the merged model
    computes what the adapted one did. paca never re-quantizes, which would change the model
    that was trained (docs/qpaca.md measures by how much for nf4). Layers that were not adapted
    stay as they are (quantized); quantize the merged model again, or call transformers'
    ``model.dequantize()`` for a fully floating-point model.

    Raises:
        PacaError: NaN/inf in the adapter, a layer disabled, sharded or offloaded weights (the
            model is unchanged).
    """
    if not _require_adapters(model, "merge"):
        return model
    layers = [(n, layer) for n, layer in paca_layers(model) if layer.active_adapter is not None]
    for name, layer in layers:
        if layer._disabled:
            raise PacaError(f"cannot merge inside paca.disabled(): {name} is disabled")
    check_finite(model, action="merge")
    for name, layer in layers:
        weight = layer.weight
        if layer.mode == "additive" and hasattr(weight, "device_mesh"):
            raise PacaError(
                f"cannot merge into {name}: its weight is sharded ({type(weight).__name__}); "
                "gather a full state dict first, or save the adapter with paca.save_adapter and "
                "load it onto an unsharded model to merge"
            )
        if layer.mode == "additive" and isinstance(weight, torch.Tensor) and weight.is_meta:
            raise PacaError(
                f"cannot merge into {name}: its weight is offloaded by accelerate (on the meta "
                "device); save the adapter with paca.save_adapter, load it onto the base model "
                "loaded without offload (paca.load_adapter) and merge that"
            )
    state = _state(model, "merge")
    others = [n for n in state.configs if n != state.active]
    if others:
        warnings.warn(
            f"merge folds the active adapter {state.active!r} and drops {others}",
            UserWarning,
            stacklevel=2,
        )
    # Dequantize every layer that needs it before touching any: a refusal leaves the model as is.
    quantized = [
        (name, layer)
        for name, layer in layers
        if layer.mode == "additive" and is_quantized(layer.base_layer)
    ]
    dtype = dtype or (_prevailing_float_dtype(model) if quantized else None)
    dense = {name: quant.to_float_linear(layer.base_layer, dtype) for name, layer in quantized}
    for name, layer in layers:
        if name in dense:
            layer.base_layer, layer.transposed = dense[name], False
        layer.fold()
    return _finish(model, keep_trained=True)


def _prevailing_float_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype holding most of the model's parameters (None if it has none)."""
    sizes: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.dtype.is_floating_point:
            sizes[param.dtype] = sizes.get(param.dtype, 0) + param.numel()
    return max(sizes, key=sizes.get) if sizes else None


def unload(model: nn.Module) -> nn.Module:
    """Removes PaCA: gives back the base model, weights bit-exact, flags as before ``enable``,
    and nothing of paca left on the model."""
    if not _require_adapters(model, "unload"):
        return model
    for _, layer in paca_layers(model):
        layer.restore_base()
    return _finish(model, keep_trained=False)


def sync_weights(model: nn.Module) -> nn.Module:
    """Writes every merged-mode layer's trained columns into its weight now.

    paca does this by itself after every ``optimizer.step()`` of a ``torch.optim`` optimizer
    (a global step post-hook), on loads and on switches. Call it yourself after changing the
    deltas any other way: an optimizer that does not go through ``torch.optim.Optimizer.step``
    (DeepSpeed's fused optimizers, a hand-written update of ``p.data``), or
    ``load_state_dict`` on the deltas. Additive-mode layers need nothing (they read ``delta``
    in every forward). Returns the model; on a model without PaCA it warns and does nothing.
    """
    if not _require_adapters(model, "sync"):
        return model
    write_columns([layer for _, layer in paca_layers(model)])
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block the model computes as the base model; on exit the adapters are back.

    Nests, and leaves the state right if the block raises.
    """
    switches = [m for _, m in _switches(model)]
    done = []
    try:
        for module in switches:
            module.disable()
            done.append(module)
        yield model
    finally:
        for module in reversed(done):
            module.enable()
