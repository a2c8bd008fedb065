"""Which modules PaCA adapts and which it trains in full: default targets per architecture
(data) and the matching rules.

``target_modules`` / ``exclude_modules`` / ``trainable_modules`` take a list of name suffixes
(``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), a regular expression matched against
the full module name, or (targets only) ``"all-linear"``. On an adapted model, names refer to the
base model: a PaCA wrapper stands for the layer it wraps.

Imports: ``paca.layer`` (to see through wrappers), ``paca.base_layer``, ``paca.config``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from paca.base_layer import SUPPORTED, is_linear
from paca.config import PacaConfig
from paca.errors import PacaError
from paca.layer import PacaLinear, TrainedCopy

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_LIKE = (
    r"(.*\.)?encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
    r"|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
# config.model_type -> default target_modules
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
        LLAMA_LIKE,
    ),
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"], BERT_LIKE),
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}
# task heads trained in full by default, on models whose class name ends in HEAD_SUFFIXES
HEAD_NAMES = ("classifier", "score", "qa_outputs")
HEAD_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def matches(name: str, spec: list[str] | str) -> bool:
    """Whether module ``name`` matches a list of suffixes or a regular expression."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` as the base model has them: a PaCA wrapper stands for its base."""
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


def default_targets(model: nn.Module) -> list[str] | str:
    """``DEFAULT_TARGETS`` of the model's architecture, or an error asking for targets."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    what = f"model_type={model_type!r}" if model_type else f"a {type(model).__name__}"
    raise PacaError(
        f"paca has no default target_modules for {what}; pass target_modules='all-linear', "
        "a list of layer-name suffixes (['q_proj', 'v_proj']) or a regular expression"
    )


def default_trainable(model: nn.Module) -> list[str]:
    """The task head of a ``*ForSequenceClassification``-like model (trained in full)."""
    if not type(model).__name__.endswith(HEAD_SUFFIXES):
        return []
    return [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]


def resolve_trainable(model: nn.Module, spec: list[str] | None) -> list[str]:
    """Full names of the modules trained in full (the outermost match of each suffix)."""
    names = default_trainable(model) if spec is None else spec
    found: list[str] = []
    for suffix in names:
        hits = [n for n, _ in base_modules(model) if n and matches(n, [suffix])]
        # Keep only the outermost match: training a module trains its children.
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
        if not hits:
            raise PacaError(
                f"trainable_modules entry {suffix!r} matches no module of {type(model).__name__}"
            )
        found.extend(h for h in hits if h not in found)
    return found


def find_targets(model: nn.Module, config: PacaConfig, trainable: list[str]) -> list[str]:
    """Full names of the layers ``config`` targets (outside the ``trainable`` modules).

    Raises:
        PacaError: a target is not a layer paca adapts, or nothing matches.
    """
    spec = config.target_modules
    all_linear = spec == "all-linear"
    if spec is None:
        spec = default_targets(model)
    skip = set()
    if all_linear and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        skip |= {n for n, m in base_modules(model) if m is head}

    def inside_trainable(name: str) -> bool:
        return any(name == t or name.startswith(t + ".") for t in trainable)

    matched = []
    for name, module in base_modules(model):
        if not name or name in skip or inside_trainable(name):
            continue
        if all_linear:
            if is_linear(module):
                matched.append(name)
            continue
        if not matches(name, spec):
            continue
        if not is_linear(module):
            raise PacaError(
                f"target {name} is a {type(module).__name__}, which paca cannot adapt; it adapts "
                f"{SUPPORTED}. Name such layers (e.g. its q_proj/v_proj) or exclude {name} "
                "with exclude_modules"
            )
        matched.append(name)
    if config.exclude_modules is not None:
        matched = [n for n in matched if not matches(n, config.exclude_modules)]
    if not matched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base_modules(model) if is_linear(m)})
        raise PacaError(
            f"target_modules={config.target_modules!r} "
            f"(exclude_modules={config.exclude_modules!r}) "
            f"matches no linear layer of {type(model).__name__}; its linear layers end in "
            f"{linear[:20]}. A string is a regular expression matched against full names; pass a "
            "list for name suffixes"
        )
    return matched
