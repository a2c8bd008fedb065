"""DropBP on any trained model: skip the backward of randomly chosen residual branches.

In a pre-norm decoder layer ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` each branch
(a norm and what follows it) is, with probability ``p`` per optimizer step, run under
``torch.no_grad()``: its output is the same tensor, the residual stream still carries the
gradient down, but nothing of the branch is stored for backward or computed in it (DropBP,
Woo et al., NeurIPS 2024). Rates can differ per branch: ``allocate_rates`` gives sensitive
branches lower rates, keeping the FLOP-weighted mean at the target.

Choices (each on purpose):

* By default one drop pattern per optimizer step, drawn by the optimizer step hook: every
  micro-batch of a gradient-accumulation step, and the recomputation of gradient checkpointing,
  see the same pattern, so a dropped branch gets no gradient at all in that step.
  ``per="micro-batch"`` draws a fresh pattern at each training forward of the model (a forward
  pre-hook on the module that holds the decoder layers), as the authors' code does: under
  gradient accumulation a branch then gets the gradient of the micro-batches it was kept in,
  and sits a step out only if it was dropped in all of them. Gradient checkpointing's
  recomputation runs the layers, not that module, so it sees the pattern of its own forward.
  Under ``torch.compile`` the draw is a graph break (``fullgraph=True`` needs ``per="step"``).
* A branch's parameters that got no gradient in a step are skipped by the optimizer in that
  step (``grad`` is ``None``), as a frozen parameter would be: AdamW does not move them by
  momentum or weight decay without fresh gradient information, and their per-parameter step
  count (Adam's bias correction) counts only the steps they took part in.
* Under ``torch.distributed`` a dropped branch still hands its parameters an exact zero
  gradient through a no-op autograd link, so DDP's reducer (``find_unused_parameters`` off or
  on) finishes every step; the step hook then sets those gradients back to ``None``. Every rank
  draws the same pattern (same seed, same step count), so the skipped parameters agree.
* ``patterns=K`` draws K patterns once and picks one of them each step: under ``torch.compile``
  and on Gaudi (static graphs) each pattern is another graph, and K bounds them.

Imports: ``paca.errors`` (nothing else of paca: it also serves LoRA and full fine-tuning).
"""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from paca.errors import PacaError

ATTRIBUTE = "paca_drop_backward"
# model_type -> the residual branches of one decoder layer, each the child modules it runs
# (in order; the last one's output joins the residual stream)
PRE_NORM = [("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")]
BRANCHES: dict[str, list[tuple[str, ...]]] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "olmo", "gemma"], PRE_NORM),
    "mixtral": [("input_layernorm", "self_attn"), ("post_attention_layernorm", "block_sparse_moe")],
    # Gemma 2/3 normalise the branch output too; OLMo 2 only there (post-norm branches)
    **dict.fromkeys(
        ["gemma2", "gemma3_text"],
        [
            ("input_layernorm", "self_attn", "post_attention_layernorm"),
            ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
        ],
    ),
    "olmo2": [("self_attn", "post_attention_layernorm"), ("mlp", "post_feedforward_layernorm")],
    "gpt2": [("ln_1", "attn"), ("ln_2", "mlp")],
}

PER = ("step", "micro-batch")  # when a drop pattern is drawn (``drop_backward(per=...)``)
_CONTROLLERS: weakref.WeakSet[DropBackward] = weakref.WeakSet()
_hooks = None


@dataclass
class Branch:
    """One residual branch: ``name`` (``model.layers.3.mlp``), its modules, FLOPs per token
    (multiply-adds of its linear layers) and drop rate."""

    name: str
    modules: tuple[nn.Module, ...]
    flops: int
    rate: float
    originals: list = field(default_factory=list, repr=False)

    def parameters(self):
        for module in self.modules:
            yield from module.parameters()


class _ZeroGrads(torch.autograd.Function):
    """Identity on ``out``; exact zero gradients for ``params`` (the DDP link of a dropped
    branch)."""

    @staticmethod
    def forward(ctx, out, *params):
        ctx.specs = [(p.shape, p.dtype, p.device) for p in params]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.specs))


def _linear_flops(module: nn.Module) -> int:
    """Multiply-adds per token of the 2-D weights under ``module`` (the linear layers)."""
    return sum(p.numel() for n, p in module.named_parameters() if p.dim() == 2 and "embed" not in n)


def allocate_rates(
    rate: float, flops: list[int], sensitivity: list[float], max_rate: float = 0.9
) -> list[float]:
    """Per-branch drop rates whose FLOP-weighted mean is ``rate``.

    Minimises ``sum(s_i * p_i**2)`` subject to ``sum(F_i * p_i) = rate * sum(F_i)`` and
    ``0 <= p_i <= max_rate``: ``p_i = min(max_rate, lam * F_i / s_i)``, ``lam`` by bisection.
    A branch twice as sensitive gets half the rate; one with twice the FLOPs, twice. Equal
    sensitivities and FLOPs give every branch ``rate``.
    """
    if not 0.0 <= rate <= max_rate:
        raise PacaError(f"drop rate {rate} must lie in [0, {max_rate}]")
    if rate == 0.0:
        return [0.0] * len(flops)
    floor = 1e-12 * max(max(sensitivity), 1e-30)
    weights = [f / max(s, floor) for f, s in zip(flops, sensitivity, strict=True)]
    target = rate * sum(flops)

    def achieved(lam: float) -> float:
        return sum(f * min(max_rate, lam * w) for f, w in zip(flops, weights, strict=True))

    low, high = 0.0, 1.0
    while achieved(high) < target * (1 - 1e-12):
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if achieved(middle) < target else (low, middle)
    return [min(max_rate, high * w) for w in weights]


class DropBackward:
    """The DropBP state of one model (``model.paca_drop_backward``)."""

    def __init__(
        self,
        model: nn.Module,
        branches: list[Branch],
        seed: int,
        patterns: int | None,
        max_rate: float = 0.9,
        per: str = "step",
    ):
        self.model = weakref.ref(model)
        self.branches = branches
        self.seed = seed
        self.max_rate = max_rate
        self.per = per
        self.steps = 0  # optimizer steps seen
        self.forwards = 0  # per="micro-batch": training forwards seen in this step
        self._kept: set[int] = set()  # per="micro-batch": branches kept in a forward this step
        self._held = False  # sensitivities() sets patterns itself
        self._forward_hook = None
        self._patterns = patterns
        self.patterns = self._fixed_patterns()
        self.dropped: frozenset[int] = frozenset()
        self._param_ids = {id(p) for b in branches for p in b.parameters()}
        self.next_pattern()

    def __deepcopy__(self, memo):
        # The wrapped forwards are closures over the original modules: a copy would silently
        # compute with the original's branches.
        raise PacaError(
            "a model with paca.drop_backward cannot be copied: call "
            "paca.remove_drop_backward(model) first, copy, then paca.drop_backward on each"
        )

    @property
    def rate(self) -> float:
        """The FLOP-weighted mean drop rate."""
        total = sum(b.flops for b in self.branches)
        return sum(b.flops * b.rate for b in self.branches) / total if total else 0.0

    def _random(self, stream: int, index: int, forward: int | None = None) -> random.Random:
        # a pattern depends on (seed, step[, forward]) alone: the same on every rank and after a
        # resume
        key = (self.seed * 1_000_003 + index) * 4 + stream
        return random.Random(key if forward is None else key * 1_000_003 + forward)

    def _draw(self, rng: random.Random) -> frozenset[int]:
        dropped = {i for i, b in enumerate(self.branches) if rng.random() < b.rate}
        # never all of them: with a frozen embedding the loss would have no gradient at all
        if len(dropped) == len(self.branches):
            dropped.discard(len(self.branches) - 1)
        return frozenset(dropped)

    def _pick(self, rng: random.Random) -> frozenset[int]:
        """A fresh pattern, or one of the fixed ``patterns``."""
        if self.patterns is None:
            return self._draw(rng)
        return self.patterns[rng.randrange(len(self.patterns))]

    def _fixed_patterns(self) -> list[frozenset[int]] | None:
        if self._patterns is None:
            return None
        return [self._draw(self._random(1, k)) for k in range(self._patterns)]

    def next_pattern(self) -> frozenset[int]:
        """Sets the pattern of step ``self.steps`` (the optimizer step hook calls this after
        counting a step; set ``steps`` first to resume). With ``per="micro-batch"`` this starts
        the step: its forwards draw their own patterns (``next_forward``)."""
        self.forwards, self._kept = 0, set()
        self.dropped = self._pick(self._random(0, self.steps))
        return self.dropped

    def next_forward(self) -> frozenset[int]:
        """``per="micro-batch"``: the pattern of the next training forward of this step."""
        self.dropped = self._pick(self._random(2, self.steps, self.forwards))
        self.forwards += 1
        self._kept |= set(range(len(self.branches))) - self.dropped
        return self.dropped

    def _on_forward(self, module, args) -> None:
        if module.training and torch.is_grad_enabled() and not self._held:
            self.next_forward()

    def sat_out(self) -> frozenset[int]:
        """The branches that got no gradient in this step: the step's pattern, or with
        ``per="micro-batch"`` those dropped in every forward of the step."""
        if self.per == "micro-batch" and self.forwards:
            return frozenset(range(len(self.branches))) - self._kept
        return self.dropped

    def set_rates(self, rates: Mapping[str, float] | list[float]) -> None:
        """Sets per-branch rates (a list in branch order, or ``{branch name: rate}``)."""
        if isinstance(rates, Mapping):
            unknown = set(rates) - {b.name for b in self.branches}
            if unknown:
                raise PacaError(
                    f"no DropBP branches named {sorted(unknown)[:3]}; the branches are "
                    f"{[b.name for b in self.branches][:4]}..."
                )
            rates = [rates.get(b.name, b.rate) for b in self.branches]
        if len(rates) != len(self.branches):
            raise PacaError(f"{len(rates)} rates for {len(self.branches)} DropBP branches")
        for branch, value in zip(self.branches, rates, strict=True):
            if not 0.0 <= value < 1.0:
                raise PacaError(f"drop rate {value} of {branch.name} must lie in [0, 1)")
            branch.rate = float(value)
        self.patterns = self._fixed_patterns()
        self.next_pattern()

    def set_sensitivity(self, sensitivity: Mapping[str, float]) -> None:
        """Per-branch rates from ``{branch name: sensitivity}`` (``allocate_rates``), keeping
        the FLOP-weighted mean rate."""
        scores = [float(sensitivity.get(b.name, math.nan)) for b in self.branches]
        missing = [b.name for b, s in zip(self.branches, scores, strict=True) if math.isnan(s)]
        if missing:
            raise PacaError(f"sensitivity has no value for {missing[:3]} (of {len(missing)})")
        flops = [b.flops for b in self.branches]
        self.set_rates(allocate_rates(self.rate, flops, scores, self.max_rate))

    def owns(self, optimizer) -> bool:
        return any(id(p) in self._param_ids for g in optimizer.param_groups for p in g["params"])

    def skip_dropped(self) -> None:
        """Leaves the parameters of the branches that sat this step out (``sat_out``) out of the
        optimizer step."""
        out = self.sat_out()
        kept = {id(p) for i, b in enumerate(self.branches) if i not in out
                for p in b.parameters()}  # fmt: skip
        for i in out:
            for param in self.branches[i].parameters():
                if id(param) not in kept:  # a parameter shared with a kept branch keeps its grad
                    param.grad = None

    # -- the branch forward
    def _wrap(self, index: int, position: int, module: nn.Module):
        original = module.forward
        last = position == len(self.branches[index].modules) - 1
        controller = self

        def forward(*args, **kwargs):
            if not (index in controller.dropped and module.training and torch.is_grad_enabled()):
                return original(*args, **kwargs)
            with torch.no_grad():
                out = original(*args, **kwargs)
            if last and torch.distributed.is_available() and torch.distributed.is_initialized():
                out = controller._link(index, out)
            return out

        return forward

    def _link(self, index: int, out):
        params = [p for p in self.branches[index].parameters() if p.requires_grad]
        if not params:
            return out
        if isinstance(out, torch.Tensor):
            return _ZeroGrads.apply(out, *params)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (_ZeroGrads.apply(out[0], *params), *out[1:])
        return out

    def install(self, holder: nn.Module | None = None) -> None:
        """Wraps the branches' forwards; with ``per="micro-batch"``, hooks ``holder`` (the
        module that holds the decoder layers) to draw a pattern at each of its forwards."""
        for index, branch in enumerate(self.branches):
            for position, module in enumerate(branch.modules):
                branch.originals.append(module.__dict__.get("forward"))
                module.forward = self._wrap(index, position, module)
        if self.per == "micro-batch":
            self._forward_hook = holder.register_forward_pre_hook(self._on_forward)

    def remove(self) -> None:
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None
        for branch in self.branches:
            for module, original in zip(branch.modules, branch.originals, strict=True):
                if original is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = original
            branch.originals.clear()
        self.dropped = frozenset()


def _before_step(optimizer, args, kwargs) -> None:
    for controller in list(_CONTROLLERS):
        if controller.sat_out() and controller.owns(optimizer):
            controller.skip_dropped()


def _after_step(optimizer, args, kwargs) -> None:
    for controller in list(_CONTROLLERS):
        if controller.owns(optimizer):
            controller.steps += 1
            controller.next_pattern()


def _decoder_branches(model: nn.Module) -> tuple[list[Branch], nn.Module | None]:
    """The residual branches of ``model``'s decoder layers, and the module that holds the first
    list of them (the one whose forward runs every layer once per forward of the model)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = BRANCHES.get(model_type)
    if spec is None:
        raise PacaError(
            f"paca.drop_backward knows the decoder layers of {sorted(BRANCHES)}, not "
            f"model_type={model_type!r} ({type(model).__name__}); add its residual branches to "
            "paca.dropbp.BRANCHES (model_type -> [(norm, attention), (norm, mlp)])"
        )
    found, holder = [], None
    modules_by_name = dict(model.named_modules())
    for name, module in modules_by_name.items():
        if not isinstance(module, nn.ModuleList):
            continue
        for index, layer in enumerate(module):
            for attrs in spec:
                if all(isinstance(getattr(layer, a, None), nn.Module) for a in attrs):
                    modules = tuple(getattr(layer, a) for a in attrs)
                    flops = sum(_linear_flops(m) for m in modules)
                    found.append(Branch(f"{name}.{index}.{attrs[-1]}", modules, flops, 0.0))
                    if holder is None:
                        holder = modules_by_name[name.rpartition(".")[0]]
    if not found:
        raise PacaError(
            f"found no decoder layers with {spec} in {type(model).__name__}; is it a "
            f"{model_type} model?"
        )
    return found, holder


def get(model: nn.Module) -> DropBackward | None:
    controller = model.__dict__.get(ATTRIBUTE)
    return controller if isinstance(controller, DropBackward) else None


def drop_backward(
    model: nn.Module,
    rate: float = 0.5,
    seed: int = 0,
    sensitivity: Mapping[str, float] | Mapping[str, torch.Tensor] | None = None,
    patterns: int | None = None,
    max_rate: float = 0.9,
    per: str = "step",
) -> nn.Module:
    """Applies DropBP to the decoder layers of ``model`` (PaCA, LoRA or fully trained).

    Args:
        model (nn.Module): a causal LM of a type in ``BRANCHES`` (or a peft model of one).
        rate (float): the FLOP-weighted mean drop rate, in ``[0, max_rate]``; ``0`` trains
            exactly as without DropBP.
        seed (int): seed of the drop patterns (the same on every rank).
        sensitivity: ``None`` (every branch drops at ``rate``), ``{branch name: sensitivity}``
            (``sensitivities`` measures them), or a batch (a mapping of tensors the model takes
            as keyword arguments, with labels) to measure on now.
        patterns (int | None): draw this many patterns once and pick one per step or
            micro-batch (bounded graphs under ``torch.compile`` and on Gaudi); ``None``: a fresh
            pattern every time.
        max_rate (float): the highest rate any one branch gets.
        per (str): ``"step"`` (one pattern per optimizer step, for all its micro-batches) or
            ``"micro-batch"`` (a pattern per training forward, as in the authors' code: under
            gradient accumulation a branch then misses only the micro-batches it was dropped in).

    Returns:
        nn.Module: ``model``; ``paca.unload``, ``paca.merge`` or ``remove_drop_backward`` take
        DropBP off again.
    """
    global _hooks
    if not 0.0 <= rate <= max_rate < 1.0:
        raise PacaError(
            f"rate={rate} (max_rate={max_rate}): use 0 <= rate <= max_rate < 1, e.g. rate=0.5"
        )
    if patterns is not None and patterns < 1:
        raise PacaError(f"patterns={patterns}: use None or a positive number")
    if per not in PER:
        raise PacaError(f"per={per!r}: use 'step' or 'micro-batch'")
    target = _base_model(model)
    branches, holder = _decoder_branches(target)
    if get(model) is not None:
        remove_drop_backward(model)
    for branch in branches:
        branch.rate = rate
    controller = DropBackward(model, branches, seed, patterns, max_rate, per)
    controller.install(holder)
    model.__dict__[ATTRIBUTE] = controller
    _CONTROLLERS.add(controller)
    if _hooks is None:
        _hooks = (
            register_optimizer_step_pre_hook(_before_step),
            register_optimizer_step_post_hook(_after_step),
        )
    if sensitivity is not None:
        if all(isinstance(v, torch.Tensor) for v in sensitivity.values()):
            sensitivity = sensitivities(model, sensitivity)
        try:
            controller.set_sensitivity(sensitivity)
        except PacaError:
            remove_drop_backward(model)
            raise
    return model


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (its config names the architecture)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def remove_drop_backward(model: nn.Module) -> nn.Module:
    """Takes DropBP off ``model`` (a no-op if it has none)."""
    controller = get(model)
    if controller is not None:
        controller.remove()
        _CONTROLLERS.discard(controller)
        model.__dict__.pop(ATTRIBUTE, None)
    return model


def sensitivities(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each branch's sensitivity on ``batch``: ``|g - g_i|^2 / |g|^2`` over all trainable
    parameters, ``g`` the gradient with nothing dropped, ``g_i`` with branch ``i`` alone dropped.

    Costs one forward and backward per branch plus one. The model's gradients, RNG state and
    drop pattern are left as they were.
    """
    controller = get(model)
    if controller is None:
        raise PacaError("sensitivities needs paca.drop_backward(model, ...) first")
    params = [p for p in model.parameters() if p.requires_grad]
    kept_grads = [p.grad for p in params]
    kept_pattern = controller.dropped
    controller._held = True

    def gradient(dropped: frozenset[int]) -> list[torch.Tensor | None]:
        controller.dropped = dropped
        for p in params:
            p.grad = None
        with torch.random.fork_rng(devices=[]):
            loss = model(**batch).loss
            loss.backward()
        return [None if p.grad is None else p.grad.detach().double() for p in params]

    try:
        reference = gradient(frozenset())
        norm = sum(float((g * g).sum()) for g in reference if g is not None) or 1.0
        scores = {}
        for index, branch in enumerate(controller.branches):
            grads = gradient(frozenset([index]))
            diff = 0.0
            for g, h in zip(reference, grads, strict=True):
                if g is None:
                    continue
                d = g if h is None else g - h
                diff += float((d * d).sum())
            scores[branch.name] = diff / norm
    finally:
        controller.dropped = kept_pattern
        controller._held = False
        for p, g in zip(params, kept_grads, strict=True):
            p.grad = g
    return scores
