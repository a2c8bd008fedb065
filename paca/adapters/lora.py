"""Export to a standard PEFT LoRA adapter.

A PaCA update touches ``r`` input columns, so it is exactly a rank-``r`` LoRA update:
``A`` (``r x in``) holds one-hot rows selecting ``idx`` and ``B = scaling * delta``
(``out x r``); with ``lora_alpha = r`` PEFT's scaling is 1 and ``B @ A`` is the PaCA update, with
no SVD and no approximation.

Imports: ``paca.model``, ``paca.adapters.common``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from paca.adapters.common import (
    ADAPTER_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    atomic_dir,
    base_model_name,
    cpu_tensors,
)
from paca.adapters.peft_paca import task_type
from paca.errors import PacaError
from paca.model import adapter_copies, adapter_layers, check_finite, resolve_adapter

logger = logging.getLogger("paca")

# vLLM's --max-lora-rank takes one of these, at least the adapter's rank
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# a causal LM's modules trained in full go here, not into modules_to_save (vLLM refuses those)
TRAINED_MODULES = "trained_modules.safetensors"


def column_selector(r: int, in_features: int, idx: torch.Tensor, dtype) -> torch.Tensor:
    """LoRA's ``A`` (``r x in``) for a PaCA adapter: row ``i`` is one-hot at column ``idx[i]``,
    so ``B @ A`` places ``B``'s columns at the trained input columns."""
    selector = torch.zeros(r, in_features, dtype=dtype)
    selector[torch.arange(r), idx.cpu()] = 1.0
    return selector


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

    Modules trained in full (``trainable_modules``) go into PEFT's ``modules_to_save`` for
    task models (classifiers: PEFT loads them). For a causal LM they are written beside the
    adapter into ``trained_modules.safetensors`` instead, with a warning naming them: LoRA
    servers refuse ``modules_to_save`` (vLLM), and a causal LM's adapter is exported to be
    served. ``serving_hints(path)`` gives the server settings the adapter needs.

    Args:
        model (nn.Module): an adapted model.
        path: the output folder; it must not exist unless ``force``.
        adapter_name (str | None): which adapter (default: the active one).
        force (bool): replace an existing folder.

    Returns:
        Path: the folder.

    Raises:
        OutputExists: ``path`` exists and ``force`` is False.
        PacaError: NaN/inf in the adapter, or Linear and Conv1D layers mixed; nothing is
            written then.
    """
    adapter_name = resolve_adapter(model, adapter_name, "export")
    target = Path(path)
    check_finite(model, adapter_name, "export")
    tensors: dict[str, torch.Tensor] = {}
    targets, conv1d = [], []
    r = None
    for name, layer, adapter in adapter_layers(model, adapter_name):
        r = adapter.r
        delta = adapter.delta.detach().to("cpu")
        selector = column_selector(adapter.r, layer.in_features, adapter.idx, delta.dtype)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = selector
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (adapter.scaling * delta).contiguous()
        targets.append(name)
        conv1d.append(layer.transposed)
    if any(conv1d) and not all(conv1d):
        raise PacaError(
            "this adapter spans nn.Linear and Conv1D layers; PEFT's fan_in_fan_out is one setting "
            "per adapter, so export it in two parts (two PaCA adapters with separate targets)"
        )
    saved_modules, trained = [], {}
    separate = task_type(model) == "CAUSAL_LM"
    for name, module in adapter_copies(model, adapter_name):
        if separate:
            trained |= cpu_tensors(module.state_dict(), prefix=f"{name}.")
            continue
        saved_modules.append(name)
        tensors |= cpu_tensors(module.state_dict(), prefix=f"{PEFT_PREFIX}{name}.")
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name(model),
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
    with atomic_dir(target, replace=force) as staging:
        save_file(tensors, str(staging / PEFT_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        if trained:
            save_file(trained, str(staging / TRAINED_MODULES), metadata={"format": "pt"})
    if trained:
        modules = sorted({k.rsplit(".", 1)[0] for k in trained})
        logger.warning(
            "paca: %s of this causal LM were trained in full; LoRA servers refuse "
            "modules_to_save, so they are in %s beside the LoRA adapter, not in it. Serve the "
            "merged model (paca merge) to include them",
            modules,
            target / TRAINED_MODULES,
        )
    return target


def serving_hints(path: str | os.PathLike) -> dict:
    """What a LoRA server needs to serve the adapter at ``path`` (an exported LoRA folder).

    Returns:
        dict: ``max_lora_rank`` (the smallest of vLLM's allowed ranks that fits), the
        ``lora_target_modules`` (module names, as vLLM's ``--lora-target-modules`` and SGLang
        take them), ``modules_to_save`` (must be empty for vLLM) and the ``vllm`` flags.
    """
    file = Path(path) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
        rank, targets = int(config["r"]), list(config["target_modules"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PacaError(
            f"{file} is not the config of a LoRA adapter ({type(exc).__name__}: {exc}); pass "
            "the folder paca.export_lora wrote"
        ) from None
    fits = [r for r in VLLM_RANKS if r >= rank]
    names = sorted({t.rsplit(".", 1)[-1] for t in targets})
    hints = {
        "max_lora_rank": fits[0] if fits else None,
        "lora_target_modules": names,
        "modules_to_save": config.get("modules_to_save") or [],
    }
    hints["vllm"] = (
        f"--enable-lora --max-lora-rank {hints['max_lora_rank']} "
        f"--lora-target-modules {' '.join(names)}"
    )
    return hints
