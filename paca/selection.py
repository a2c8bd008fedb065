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
gradient; its cost is reported (``paca.get_state(model).calibration``).

The strategies are a registry: a new one is one function and one decorator, ``@chooser`` for a
rule that picks indices from the layer's shape and seed, ``@scorer`` for one that scores every
column (the top ``r`` are taken); its help line is the function's docstring.

Imports: ``paca.base_layer``, ``paca.quant`` (dequantizing a quantized layer's weight),
``paca.layer`` (to read through a wrapper).
"""

from __future__ import annotations

import logging
import resource
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from paca import quant
from paca.base_layer import is_conv1d
from paca.errors import PacaError
from paca.layer import PacaLinear

logger = logging.getLogger("paca")


@dataclass(frozen=True)
class Strategy:
    """A registered column-selection strategy.

    Attributes:
        name (str): its ``selection=`` value.
        help (str): one line for docs and ``--help`` (the function's docstring).
        choose (Callable | None): ``(in_features, r, *, seed, name) -> (r,) indices``.
        score (Callable | None): ``(model, names, calibration) -> {name: (in_features,)
            scores}``; the top ``r`` columns are chosen.
        calibrated (bool): ``score`` needs calibration batches.
    """

    name: str
    help: str
    choose: Callable | None = None
    score: Callable | None = None
    calibrated: bool = False


STRATEGIES: dict[str, Strategy] = {}


def _help(fn: Callable) -> str:
    return " ".join((fn.__doc__ or "").split("\n\n")[0].split())


def chooser(name: str):
    """Registers ``fn(in_features, r, *, seed, name) -> indices`` as strategy ``name``."""

    def register(fn):
        STRATEGIES[name] = Strategy(name, _help(fn), choose=fn)
        return fn

    return register


def scorer(name: str, *, calibrated: bool = False):
    """Registers ``fn(model, names, calibration) -> {layer: scores}`` as strategy ``name``."""

    def register(fn):
        STRATEGIES[name] = Strategy(name, _help(fn), score=fn, calibrated=calibrated)
        return fn

    return register


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``, or an error listing the known ones."""
    if name not in STRATEGIES:
        raise PacaError(f"selection={name!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def describe_strategies() -> str:
    """``name: help`` of every strategy, one per line (for ``--help`` and docs)."""
    return "; ".join(f"{s.name}: {s.help}" for s in STRATEGIES.values())


@chooser("random")
def _random(in_features: int, r: int, *, seed: int, name: str) -> torch.Tensor:
    """a seeded random choice per layer (the default)."""
    # A generator of our own, seeded from the seed and the layer name: the choice is the same
    # whatever the global RNG state, and differs between layers of the same shape.
    generator = torch.Generator(device="cpu")
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randperm(in_features, generator=generator)[:r].sort().values


def _top(in_features: int, r: int, scores: torch.Tensor | None, name: str) -> torch.Tensor:
    if scores is None or scores.shape != (in_features,):
        raise PacaError(f"no column scores of shape ({in_features},) for {name or 'a layer'}")
    # stable: among equal scores the lower index wins, so the choice is deterministic
    order = torch.argsort(scores.detach().float().cpu(), descending=True, stable=True)
    return order[:r].sort().values


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

    Raises:
        PacaError: unknown strategy, ``r`` out of range, or missing scores.
    """
    chosen = get_strategy(strategy)
    if not 1 <= r <= in_features:
        raise PacaError(
            f"r={r} is out of range for {name or 'a layer'} with in_features={in_features}"
        )
    if chosen.choose is not None:
        return chosen.choose(in_features, r, seed=seed, name=name)
    return _top(in_features, r, scores, name)


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a plain, Conv1D, quantized or already adapted layer."""
    if isinstance(module, PacaLinear):
        module = module.base_layer
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point:
        if type(weight.data) is not torch.Tensor or weight.is_meta:
            raise PacaError(
                f"selection='weight-norm' cannot read a {type(weight.data).__name__} weight "
                f"on {weight.device}; select before sharding or offloading, or use "
                "selection='random'"
            )
        return weight.detach().t() if is_conv1d(module) else weight.detach()
    return quant.dequantize(module, torch.float32)


@scorer("weight-norm")
def _weight_norm(model: nn.Module, names: list[str], calibration) -> dict[str, torch.Tensor]:
    """the r input columns of W with the largest L2 norm."""
    return {n: _dense_weight(model.get_submodule(n)).float().norm(dim=0).cpu() for n in names}


def _batches(calibration) -> Iterable:
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, Mapping)):
        return [calibration]
    return calibration


class _Counted:
    """The calibration batches, counted as a scorer goes through them (a generator can be
    iterated only once, so they are not counted beforehand)."""

    def __init__(self, calibration):
        self.calibration, self.count = calibration, 0

    def __iter__(self):
        for batch in _batches(self.calibration):
            self.count += 1
            yield batch


def _call(model: nn.Module, batch, device: torch.device):
    if isinstance(batch, Mapping):  # dicts, and transformers' BatchEncoding
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return model(**moved)
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device))
    raise PacaError(
        f"calibration batches must be dicts of tensors or tensors, got {type(batch).__name__}"
    )


def _input_embeddings(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_input_embeddings", None)
    module = getter() if callable(getter) else None
    if module is None:
        module = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if module is None:
        raise PacaError(
            "selection='gradient' needs a model with an input embedding (to start the backward "
            "pass without training any weight); use selection='activation' instead"
        )
    return module


class _Calibrating:
    """Eval mode, every weight frozen (so a backward fills no weight gradient) and the given
    hooks, for the length of a calibration; everything is put back on exit."""

    def __init__(self, model: nn.Module, hooks: list[Callable[[], object]]):
        self.model, self.make_hooks = model, hooks

    def __enter__(self):
        self.was_training = self.model.training
        self.frozen = [p for p in self.model.parameters() if p.requires_grad]
        self.handles = []
        self.model.eval()
        for param in self.frozen:
            param.requires_grad_(False)
        try:
            self.handles = [make() for make in self.make_hooks]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        for param in self.frozen:
            param.requires_grad_(True)
        self.model.train(self.was_training)
        return False


def _run_batches(model: nn.Module, calibration, step: Callable) -> int:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    count = 0
    for batch in _batches(calibration):
        count += 1
        step(batch, device)
    if count == 0:
        raise PacaError(
            "this selection needs calibration batches: pass calibration=[batch, ...] (a list "
            "or a DataLoader of model inputs) to paca.enable"
        )
    return count


def _check_reached(names: list[str], sums: dict) -> None:
    missing = [n for n in names if n not in sums]
    if missing:
        raise PacaError(
            f"calibration never reached {missing[:3]}{' ...' if len(missing) > 3 else ''}: "
            "these layers were not called (or got no gradient) on the calibration batches"
        )


@scorer("activation", calibrated=True)
def _activation(model: nn.Module, names: list[str], calibration) -> dict[str, torch.Tensor]:
    """the r input channels with the largest mean |x| over calibration batches."""
    sums: dict[str, torch.Tensor] = {}
    rows = dict.fromkeys(names, 0)

    def hook(name):
        def record(module, args):
            x = args[0].detach().flatten(0, -2).float()
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
            rows[name] += x.shape[0]

        return lambda: model.get_submodule(name).register_forward_pre_hook(record)

    def step(batch, device):
        with torch.no_grad():
            _call(model, batch, device)

    with _Calibrating(model, [hook(n) for n in names]):
        _run_batches(model, calibration, step)
    _check_reached(names, sums)
    return {n: (sums[n] / max(rows[n], 1)).cpu() for n in names}


@scorer("gradient", calibrated=True)
def _gradient(model: nn.Module, names: list[str], calibration) -> dict[str, torch.Tensor]:
    """the r columns with the largest norm of the loss's dense weight gradient."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().flatten(0, -2).float()
            if not output.requires_grad:
                return

            def on_grad(grad):
                g = grad.detach().flatten(0, -2).float()
                # squared column norms of g.T @ x without forming it when the batch is smaller
                # than the layer: diag(x.T (g g.T) x)
                if g.shape[0] <= g.shape[1]:
                    col = (x * ((g @ g.t()) @ x)).sum(0)
                else:
                    col = (g.t() @ x).square().sum(0)
                sums[name] = sums.get(name, 0) + col

            output.register_hook(on_grad)

        return lambda: model.get_submodule(name).register_forward_hook(record)

    embeddings = _input_embeddings(model)
    # the backward starts at the embeddings' output, so no weight needs a gradient
    start = [
        lambda: embeddings.register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
    ]

    def step(batch, device):
        with torch.enable_grad():
            loss = getattr(_call(model, batch, device), "loss", None)
            if loss is None:
                raise PacaError(
                    "selection='gradient': the model's output has no loss; give calibration "
                    "batches with labels"
                )
            loss.backward()

    with _Calibrating(model, [hook(n) for n in names] + start):
        _run_batches(model, calibration, step)
    _check_reached(names, sums)
    return {n: sums[n].sqrt().cpu() for n in names}


def column_scores(
    model: nn.Module, names: list[str], strategy: str, calibration=None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Scores of every input column of the layers ``names`` for a score-based strategy.

    Returns the scores (``(in_features,)`` float32 on the CPU, per layer) and a report of the
    cost (``seconds``, ``batches``, peak memory). Changes no weight, leaves no gradient and
    restores the model's train/eval mode.

    Raises:
        PacaError: the strategy has no scores, or the calibration did not reach every layer.
    """
    chosen = get_strategy(strategy)
    if chosen.score is None:
        raise PacaError(f"selection={strategy!r} has no column scores")
    started = time.perf_counter()
    batches = _Counted(calibration)
    scores = chosen.score(model, names, batches)
    report = {
        "strategy": strategy,
        "layers": len(names),
        "batches": batches.count,
        "seconds": round(time.perf_counter() - started, 3),
        # the process's peak resident memory so far (includes the model); on an accelerator
        # see torch.<device>.max_memory_allocated
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    logger.info("paca column selection %s", report)
    return scores, report
