"""Model surgery: enable, merge, unload and disable PaCA over a whole model."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from paca import backends, quant
from paca.config import PacaConfig
from paca.layer import (
    PacaAdapter,
    PacaLinear,
    TrainedCopy,
    has_user_hooks,
    is_linear,
    linear_shape,
    merged_unsupported_reason,
)
from paca.selection import CALIBRATED, SCORED, column_scores, select_columns

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BERT_LIKE = (
    r"(.*\.)?encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
    r"|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
        ],
        _LLAMA_LIKE,
    ),
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"], _BERT_LIKE),
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}
_HEAD_NAMES = ("classifier", "score", "qa_outputs")
_HEAD_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")

# Set on an adapted model: the active adapter's config and name, every adapter's config, and the
# requires_grad flags to give back on unload/merge.
_CONFIG_ATTR = "paca_config"
_ACTIVE_ATTR = "paca_active_adapter"
_CONFIGS_ATTR = "paca_configs"
_FLAGS_ATTR = "_paca_requires_grad"
_ATTRS = (_CONFIG_ATTR, _ACTIVE_ATTR, _CONFIGS_ATTR, _FLAGS_ATTR)


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


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
        raise ValueError(
            f"adapter layer {name} from {source} does not exist in {type(model).__name__}; "
            "was the adapter trained on another model?"
        ) from None
    module = module.base_layer if isinstance(module, PacaLinear) else module
    if not is_linear(module):
        raise ValueError(
            f"adapter layer {name} from {source} is a {type(module).__name__} in this model"
        )
    return module


def is_enabled(model: nn.Module) -> bool:
    return any(isinstance(m, (PacaLinear, TrainedCopy)) for m in model.modules())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _default_targets(model: nn.Module) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    what = f"model_type={model_type!r}" if model_type else f"a {type(model).__name__}"
    raise ValueError(
        f"paca has no default target_modules for {what}; pass target_modules='all-linear', "
        "a list of layer-name suffixes (['q_proj', 'v_proj']) or a regular expression"
    )


def _default_trainable(model: nn.Module) -> list[str]:
    if not type(model).__name__.endswith(_HEAD_SUFFIXES):
        return []
    return [name for name in _HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]


def _named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules as the base model has them: a PaCA wrapper stands for its base module."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, PacaLinear):
            inside.append(name)
            yield name, module.base_layer
        elif isinstance(module, TrainedCopy):
            inside.append(name)
            yield name, module.original
        else:
            yield name, module


def _resolve_trainable(model: nn.Module, spec: list[str] | None) -> list[str]:
    names = _default_trainable(model) if spec is None else spec
    found: list[str] = []
    for suffix in names:
        hits = [n for n, _ in _named_modules(model) if n and _matches(n, [suffix])]
        # Keep only the outermost match: training a module trains its children.
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
        if not hits:
            raise ValueError(
                f"trainable_modules entry {suffix!r} matches no module of {type(model).__name__}"
            )
        found.extend(h for h in hits if h not in found)
    return found


def _find_targets(model: nn.Module, config: PacaConfig, trainable: list[str]) -> list[str]:
    spec = config.target_modules
    all_linear = spec == "all-linear"
    if spec is None:
        spec = _default_targets(model)
    skip = set()
    if all_linear and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        skip |= {n for n, m in _named_modules(model) if m is head}

    def inside_trainable(name: str) -> bool:
        return any(name == t or name.startswith(t + ".") for t in trainable)

    matched = []
    for name, module in _named_modules(model):
        if not name or name in skip or inside_trainable(name):
            continue
        if all_linear:
            if is_linear(module):
                matched.append(name)
            continue
        if not _matches(name, spec):
            continue
        if not is_linear(module):
            raise ValueError(
                f"target {name} is a {type(module).__name__}, which paca cannot adapt; it adapts "
                f"{quant.SUPPORTED}. Name such layers (e.g. its q_proj/v_proj) or exclude {name} "
                "with exclude_modules"
            )
        matched.append(name)
    if config.exclude_modules is not None:
        matched = [n for n in matched if not _matches(n, config.exclude_modules)]
    if not matched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in _named_modules(model) if is_linear(m)})
        raise ValueError(
            f"target_modules={config.target_modules!r} "
            f"(exclude_modules={config.exclude_modules!r}) "
            f"matches no linear layer of {type(model).__name__}; its linear layers end in "
            f"{linear[:20]}. A string is a regular expression matched against full names; pass a "
            "list for name suffixes"
        )
    return matched


def _model_devices(model: nn.Module) -> set[torch.device]:
    return {t.device for t in [*model.parameters(), *model.buffers()]}


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
    reports: dict | None = None,
) -> list[_Plan]:
    """Checks every target before anything changes: enable is all or nothing."""
    names = targets if targets is not None else _find_targets(model, config, trainable)
    scores: dict[str, torch.Tensor] = {}
    if indices is None:
        scores = _selection_scores(
            model, names, config, calibration, reports if reports is not None else {}
        )
    plans = []
    hooked = []
    for name in names:
        module = model.get_submodule(name)
        existing = module if isinstance(module, PacaLinear) else None
        module = existing.base_layer if existing is not None else module
        in_features, _ = linear_shape(module)
        if config.r > in_features:
            raise ValueError(
                f"r={config.r} exceeds in_features={in_features} of {name}; choose "
                f"r <= {in_features} or exclude that layer with exclude_modules=[{name!r}]"
            )
        reason = merged_unsupported_reason(module)
        if config.mode == "merged" and reason is not None and existing is None:
            raise ValueError(
                f"mode='merged' cannot adapt {name}: {reason}; use mode='additive' or mode='auto'"
            )
        if existing is not None:
            mode = existing.mode  # a layer's adapters share one mode
        elif config.mode == "auto":
            mode = "merged" if reason is None and not has_user_hooks(module) else "additive"
        else:
            mode = config.mode
        if existing is None and mode == "merged" and has_user_hooks(module):
            hooked.append(name)
        if indices is not None:
            idx = indices[name]
        else:
            idx = select_columns(
                in_features,
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
    return plans


def _selection_scores(model, names, config: PacaConfig, calibration, reports: dict) -> dict:
    """Column scores for a score-based selection (run before anything changes)."""
    if config.selection in CALIBRATED and calibration is None:
        raise ValueError(
            f"selection={config.selection!r} needs calibration batches: pass "
            "calibration=[batch, ...] (model inputs; with labels for 'gradient')"
        )
    if config.selection not in CALIBRATED and calibration is not None:
        raise ValueError(
            f"calibration= is used by selection='activation' or 'gradient' only, not "
            f"{config.selection!r}; drop it or choose one of those"
        )
    if config.selection not in SCORED:
        return {}
    for name in names:  # the error for a bad r comes before any calibration work
        module = model.get_submodule(name)
        module = module.base_layer if isinstance(module, PacaLinear) else module
        if config.r > linear_shape(module)[0]:
            return {}
    scores, report = column_scores(model, names, config.selection, calibration)
    reports["calibration"] = report
    return scores


def _settings_to_config(config: PacaConfig | None, **settings) -> PacaConfig:
    settings["device"] = str(settings["device"])
    if config is None:
        return PacaConfig(**settings)
    defaults = PacaConfig()
    changed = [k for k, v in settings.items() if v != getattr(defaults, k)]
    if changed:
        raise ValueError(
            f"pass either config= or keyword settings, not both (got config and {changed})"
        )
    return config


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name={name!r} must be a non-empty string without dots")


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
        model (nn.Module): any PyTorch / Hugging Face model.
        adapter_name (str): name of this (active) adapter.
        calibration: batches of model inputs for ``selection="activation"`` or ``"gradient"``
            (a list or DataLoader; dicts of tensors, with labels for ``"gradient"``). The cost
            of the calibration is left in ``model.paca_calibration``. See ``paca.selection``.

    Returns:
        nn.Module: the same model object, adapted, on the resolved device.
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
    return _enable(model, config, adapter_name=adapter_name, calibration=calibration)


def _enable(
    model: nn.Module,
    config: PacaConfig,
    targets: list[str] | None = None,
    indices: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    calibration=None,
) -> nn.Module:
    _check_adapter_name(adapter_name)
    if is_enabled(model):
        raise ValueError(
            f"{type(model).__name__} already has {len(paca_layers(model))} PaCA layers; call "
            "paca.unload(model) or paca.merge(model) first, paca.add_adapter(model, name, ...) "
            "for another adapter, or paca.load_adapter to replace this one"
        )
    trainable = _resolve_trainable(model, config.trainable_modules)
    config = dataclasses.replace(config, trainable_modules=trainable)
    reports: dict = {}
    plans = _plan(model, config, trainable, targets, indices, calibration, reports)
    devices = _model_devices(model)
    current = next(iter(devices)) if len(devices) == 1 else None
    if len(devices) > 1 and config.device == "auto":
        target_device = None  # a model spread over devices (device_map) stays where it is
    else:
        target_device = backends.resolve_device(config.device, current)

    # Nothing has changed so far; from here on, undo everything on failure.
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    replaced: list[tuple[str, nn.Module]] = []
    try:
        if target_device is not None and devices != {target_device}:
            model.to(target_device)
        for device_type in {d.type for d in _model_devices(model)}:
            backends.load(device_type)
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
            _set_submodule(model, name, module)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        if target_device is not None and len(devices) == 1 and devices != {target_device}:
            model.to(next(iter(devices)))
        raise
    setattr(model, _CONFIGS_ATTR, {adapter_name: config})
    setattr(model, _CONFIG_ATTR, config)
    setattr(model, _ACTIVE_ATTR, adapter_name)
    setattr(model, _FLAGS_ATTR, flags)
    if "calibration" in reports:
        model.paca_calibration = reports["calibration"]
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    return list(getattr(model, _CONFIGS_ATTR, {}))


def resolve_adapter(model: nn.Module, adapter_name: str | None = None, action: str = "use") -> str:
    """``adapter_name`` (default: the active adapter), or an error saying why it cannot be
    ``action``-ed: no adapters at all, or no adapter of that name."""
    names = adapter_names(model)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no PaCA adapters to {action}; call paca.enable first"
        )
    name = adapter_name or getattr(model, _ACTIVE_ATTR)
    if name not in names:
        raise ValueError(f"{type(model).__name__} has no adapter named {name!r}; it has {names}")
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
    return _add_adapter(model, adapter_name, config, calibration=calibration)


def _add_adapter(
    model: nn.Module,
    adapter_name: str,
    config: PacaConfig,
    targets: list[str] | None = None,
    indices: dict[str, torch.Tensor] | None = None,
    calibration=None,
) -> nn.Module:
    _check_adapter_name(adapter_name)
    if not is_enabled(model):
        raise ValueError(f"{type(model).__name__} has no PaCA adapters; call paca.enable first")
    if adapter_name in adapter_names(model):
        raise ValueError(f"{type(model).__name__} already has an adapter named {adapter_name!r}")
    trainable = _resolve_trainable(model, config.trainable_modules)
    config = dataclasses.replace(config, trainable_modules=trainable)
    plans = _plan(model, config, trainable, targets, indices, calibration)
    active = getattr(model, _ACTIVE_ATTR)
    added: list[tuple[str, nn.Module]] = []  # (name, module to put back, or None)
    try:
        for plan in plans:
            current = model.get_submodule(plan.name)
            if isinstance(current, PacaLinear):
                current.add_adapter(adapter_name, plan.idx, config.alpha)
                added.append((plan.name, None))
            else:
                layer = PacaLinear(plan.module, plan.idx, config.alpha, plan.mode, adapter_name)
                layer.set_adapter(active)
                _set_submodule(model, plan.name, layer)
                added.append((plan.name, plan.module))
        for name in trainable:
            current = model.get_submodule(name)
            if isinstance(current, TrainedCopy):
                current.add_adapter(adapter_name)
                added.append((name, None))
            else:
                wrapper = TrainedCopy(current, adapter_name)
                wrapper.set_adapter(active)
                _set_submodule(model, name, wrapper)
                added.append((name, current))
    except BaseException:
        for name, original in reversed(added):
            if original is not None:
                _set_submodule(model, name, original)
            else:
                model.get_submodule(name).delete_adapter(adapter_name)
        raise
    getattr(model, _CONFIGS_ATTR)[adapter_name] = config
    return model


def _switches(model: nn.Module) -> list[tuple[str, PacaLinear | TrainedCopy]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (PacaLinear, TrainedCopy))]


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Makes ``adapter_name`` the active (computing and trainable) adapter of every layer."""
    resolve_adapter(model, adapter_name, "switch")
    for _, module in _switches(model):
        module.set_adapter(adapter_name)
    setattr(model, _ACTIVE_ATTR, adapter_name)
    setattr(model, _CONFIG_ATTR, getattr(model, _CONFIGS_ATTR)[adapter_name])
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Removes one adapter. Deleting the active one switches to the first remaining adapter
    (with a warning); the last one is removed with ``paca.unload`` or folded with ``paca.merge``.
    """
    resolve_adapter(model, adapter_name, "delete")
    remaining = [n for n in adapter_names(model) if n != adapter_name]
    if not remaining:
        raise ValueError(
            f"{adapter_name!r} is the model's only adapter; use paca.unload(model) to remove it "
            "or paca.merge(model) to fold it into the weights"
        )
    if getattr(model, _ACTIVE_ATTR) == adapter_name:
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
            base = module.base_layer if isinstance(module, PacaLinear) else module.original
            _set_submodule(model, name, base)
    del getattr(model, _CONFIGS_ATTR)[adapter_name]
    return model


def _finish(model: nn.Module, replacement: str) -> nn.Module:
    """Swaps every PaCA module for the module named by ``replacement`` and restores flags."""
    for name, layer in paca_layers(model):
        _set_submodule(model, name, layer.base_layer)
    for name, wrapper in _trained_copies(model):
        keep = wrapper.original
        if replacement == "trained" and wrapper.active_adapter is not None:
            keep = wrapper.trained
        _set_submodule(model, name, keep)
    flags = getattr(model, _FLAGS_ATTR, {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    for attr in _ATTRS:
        if hasattr(model, attr):
            delattr(model, attr)
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
    """
    if not _require_adapters(model, "merge"):
        return model
    layers = [(n, layer) for n, layer in paca_layers(model) if layer.active_adapter is not None]
    for name, layer in layers:
        if layer._disabled:
            raise RuntimeError(f"cannot merge inside paca.disabled(): {name} is disabled")
        if not torch.isfinite(layer.delta).all():
            raise ValueError(
                f"delta of {name} holds NaN or inf; refusing to merge (model unchanged)"
            )
        weight = layer.weight
        if layer.mode == "additive" and hasattr(weight, "device_mesh"):
            raise ValueError(
                f"cannot merge into {name}: its weight is sharded ({type(weight).__name__}); "
                "gather a full state dict first, or save the adapter with paca.save_adapter and "
                "load it onto an unsharded model to merge"
            )
    others = [n for n in adapter_names(model) if n != getattr(model, _ACTIVE_ATTR)]
    if others:
        warnings.warn(
            f"merge folds the active adapter {getattr(model, _ACTIVE_ATTR)!r} and drops {others}",
            UserWarning,
            stacklevel=2,
        )
    # Dequantize every layer that needs it before touching any: a refusal leaves the model as is.
    quantized = [
        (name, layer)
        for name, layer in layers
        if layer.mode == "additive" and quant.is_quantized(layer.base_layer)
    ]
    dtype = dtype or (_prevailing_float_dtype(model) if quantized else None)
    dense = {name: quant.to_float_linear(layer.base_layer, dtype) for name, layer in quantized}
    for name, layer in layers:
        if name in dense:
            layer.base_layer, layer.transposed = dense[name], False
        layer.fold()
    return _finish(model, "trained")


def _prevailing_float_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype holding most of the model's parameters (None if it has none)."""
    sizes: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.dtype.is_floating_point:
            sizes[param.dtype] = sizes.get(param.dtype, 0) + param.numel()
    return max(sizes, key=sizes.get) if sizes else None


def unload(model: nn.Module) -> nn.Module:
    """Removes PaCA: gives back the base model, weights bit-exact, flags as before ``enable``."""
    if not _require_adapters(model, "unload"):
        return model
    for _, layer in paca_layers(model):
        layer.restore_base()
    return _finish(model, "original")


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
