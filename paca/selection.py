"""Column selection: which ``r`` input channels of a layer PaCA trains.

Every strategy returns a sorted ``LongTensor`` of exactly ``r`` distinct indices, so shapes are
static (Gaudi graphs and ``torch.compile`` stay valid) and the choice is saved with the adapter.
"""

from __future__ import annotations

import zlib

import torch


def _random(in_features: int, r: int, *, seed: int, name: str, **_: object) -> torch.Tensor:
    # A generator of our own, seeded from the seed and the layer name: the choice is the same
    # whatever the global RNG state, and differs between layers of the same shape.
    generator = torch.Generator(device="cpu")
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randperm(in_features, generator=generator)[:r].sort().values


STRATEGIES = {"random": _random}


def select_columns(
    in_features: int, r: int, *, strategy: str = "random", seed: int = 0, name: str = ""
) -> torch.Tensor:
    """Chooses the trained input columns of one layer.

    Args:
        in_features (int): number of input channels of the layer.
        r (int): how many to choose, ``1 <= r <= in_features``.
        strategy (str): a key of ``STRATEGIES``.
        seed (int): seed of the choice.
        name (str): the layer's module name (mixed into the seed).

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
    return STRATEGIES[strategy](in_features, r, seed=seed, name=name)
