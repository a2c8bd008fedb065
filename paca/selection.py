"""Column selection: which ``r`` input channels of a layer PaCA trains.

Every strategy returns a sorted ``LongTensor`` of exactly ``r`` distinct indices, so shapes are
static (Gaudi graphs and ``torch.compile`` stay valid) and the choice is saved with the adapter
(loading an adapter needs no calibration).

- ``random`` (default): a seeded random choice per layer.
- ``weight-norm``: the ``r`` input columns of ``W`` with the largest L2 norm.
- ``activation``: the ``r`` input channels with the largest mean ``|x|`` over calibration
  batches (outlier channels, in the spirit of Wanda / OwLore).
- ``gradient``: the ``r`` columns with the largest norm of the dense weight gradient of the
  loss, summed over calibration batches as squared per-batch column norms. Computed per layer in
  the backward pass from ``x`` and the output gradient, without allocating any weight gradient.
  Each targeted layer's input is held from its forward until its output gradient arrives, then
  dropped: one calibration batch costs about the activation memory of a fine-tuning step.

``activation`` and ``gradient`` need ``calibration=``: an iterable of batches (dicts of tensors
for ``model(**batch)``, or tensors for ``model(batch)``; ``gradient`` needs a ``loss`` in the
output, so include labels). Calibration runs in eval mode, changes no weight and leaves no
gradient; its cost is reported (``model.paca_calibration``).
"""

from __future__ import annotations

import logging
import resource
import time
import zlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

logger = logging.getLogger("paca")


def _random(in_features: int, r: int, *, seed: int, name: str, **_: object) -> torch.Tensor:
    # A generator of our own, seeded from the seed and the layer name: the choice is the same
    # whatever the global RNG state, and differs between layers of the same shape.
    generator = torch.Generator(device="cpu")
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randperm(in_features, generator=generator)[:r].sort().values


def _top(in_features: int, r: int, *, scores: torch.Tensor, name: str, **_: object):
    if scores is None or scores.shape != (in_features,):
        raise ValueError(f"no column scores of shape ({in_features},) for {name or 'a layer'}")
    # stable: among equal scores the lower index wins, so the choice is deterministic
    order = torch.argsort(scores.detach().float().cpu(), descending=True, stable=True)
    return order[:r].sort().values


STRATEGIES = {"random": _random, "weight-norm": _top, "activation": _top, "gradient": _top}
SCORED = ("weight-norm", "activation", "gradient")
CALIBRATED = ("activation", "gradient")


def select_columns(
    in_features: int,
    r: int,
    *,
    strategy: str = "random",
    seed: int = 0,
    name: str = "",
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chooses the trained input columns of one layer.

    Args:
        in_features (int): number of input channels of the layer.
        r (int): how many to choose, ``1 <= r <= in_features``.
        strategy (str): a key of ``STRATEGIES``.
        seed (int): seed of the choice.
        name (str): the layer's module name (mixed into the seed).
        scores (torch.Tensor | None): ``(in_features,)`` column scores (``column_scores``) for
            the score-based strategies.

    Returns:
        torch.Tensor: sorted int64 indices of shape ``(r,)`` on the CPU.
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown selection strategy {strategy!r}; choose one of {sorted(STRATEGIES)}"
        )
    if not 1 <= r <= in_features:
        raise ValueError(
            f"r={r} is out of range for {name or 'a layer'} with in_features={in_features}"
        )
    return STRATEGIES[strategy](in_features, r, seed=seed, name=name, scores=scores)


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a plain, Conv1D, quantized or already adapted layer."""
    from paca import quant
    from paca.layer import PacaLinear, is_conv1d

    if isinstance(module, PacaLinear):
        module = module.base_layer
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point:
        if type(weight.data) is not torch.Tensor:
            raise ValueError(
                f"selection='weight-norm' cannot read a {type(weight.data).__name__} weight; "
                "select before sharding, or use selection='random'"
            )
        return weight.detach().t() if is_conv1d(module) else weight.detach()
    return quant.dequantize(module, torch.float32)


def _batches(calibration) -> Iterable:
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, Mapping)):
        return [calibration]
    return calibration


def _call(model: nn.Module, batch, device: torch.device):
    if isinstance(batch, Mapping):  # dicts, and transformers' BatchEncoding
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return model(**moved)
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device))
    raise TypeError(
        f"calibration batches must be dicts of tensors or tensors, got {type(batch).__name__}"
    )


def _input_embeddings(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_input_embeddings", None)
    module = getter() if callable(getter) else None
    if module is None:
        module = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if module is None:
        raise ValueError(
            "selection='gradient' needs a model with an input embedding (to start the backward "
            "pass without training any weight); use selection='activation' instead"
        )
    return module


def column_scores(
    model: nn.Module, names: list[str], strategy: str, calibration=None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Scores of every input column of the layers ``names`` for a score-based strategy.

    Returns the scores (``(in_features,)`` float32 on the CPU, per layer) and a report of the
    cost (``seconds``, ``batches``, peak memory). Changes no weight, leaves no gradient and
    restores the model's train/eval mode.
    """
    if strategy not in SCORED:
        raise ValueError(f"selection={strategy!r} has no column scores")
    started = time.perf_counter()
    batches = 0
    if strategy == "weight-norm":
        scores = {n: _dense_weight(model.get_submodule(n)).float().norm(dim=0).cpu() for n in names}
    else:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        sums: dict[str, torch.Tensor] = {}
        rows = dict.fromkeys(names, 0)
        hooks = []

        def activation_hook(name):
            def hook(module, args):
                x = args[0].detach().flatten(0, -2).float()
                sums[name] = sums.get(name, 0) + x.abs().sum(0)
                rows[name] += x.shape[0]

            return hook

        def gradient_hook(name):
            def hook(module, args, output):
                x = args[0].detach().flatten(0, -2).float()
                if not output.requires_grad:
                    return

                def on_grad(grad):
                    g = grad.detach().flatten(0, -2).float()
                    # squared column norms of g.T @ x without forming it when the batch is
                    # smaller than the layer: diag(x.T (g g.T) x)
                    if g.shape[0] <= g.shape[1]:
                        col = (x * ((g @ g.t()) @ x)).sum(0)
                    else:
                        col = (g.t() @ x).square().sum(0)
                    sums[name] = sums.get(name, 0) + col

                output.register_hook(on_grad)

            return hook

        was_training = model.training
        frozen = [p for p in model.parameters() if p.requires_grad]
        model.eval()
        try:
            for param in frozen:  # the backward pass must not fill any weight gradient
                param.requires_grad_(False)
            for name in names:
                module = model.get_submodule(name)
                if strategy == "activation":
                    hooks.append(module.register_forward_pre_hook(activation_hook(name)))
                else:
                    hooks.append(module.register_forward_hook(gradient_hook(name)))
            if strategy == "gradient":
                hooks.append(
                    _input_embeddings(model).register_forward_hook(
                        lambda m, a, out: out.detach().requires_grad_(True)
                    )
                )
            for batch in _batches(calibration):
                batches += 1
                if strategy == "activation":
                    with torch.no_grad():
                        _call(model, batch, device)
                    continue
                with torch.enable_grad():
                    output = _call(model, batch, device)
                    loss = getattr(output, "loss", None)
                    if loss is None:
                        raise ValueError(
                            "selection='gradient': the model's output has no loss; give "
                            "calibration batches with labels"
                        )
                    loss.backward()
        finally:
            for hook in hooks:
                hook.remove()
            for param in frozen:
                param.requires_grad_(True)
            model.train(was_training)
        if batches == 0:
            raise ValueError(
                f"selection={strategy!r} needs calibration batches: pass calibration=[batch, "
                "...] (a list or a DataLoader of model inputs) to paca.enable"
            )
        missing = [n for n in names if n not in sums]
        if missing:
            raise ValueError(
                f"calibration never reached {missing[:3]}{' ...' if len(missing) > 3 else ''}: "
                "these layers were not called (or got no gradient) on the calibration batches"
            )
        if strategy == "activation":
            scores = {n: (sums[n] / max(rows[n], 1)).cpu() for n in names}
        else:
            scores = {n: sums[n].sqrt().cpu() for n in names}
    report = {
        "strategy": strategy,
        "layers": len(names),
        "batches": batches,
        "seconds": round(time.perf_counter() - started, 3),
        # the process's peak resident memory so far (includes the model); on an accelerator
        # see torch.<device>.max_memory_allocated
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    logger.info("paca column selection %s", report)
    return scores, report
