"""How much the chosen columns of different layers coincide, per adapter folder.

Counts, for each group of layers that read the same kind of input, how many distinct input
channels the layers' columns cover and what share of all picks the 8 most-picked channels take.
Used in docs/accuracy.md to explain why the scored selections lose to random ones::

    for s in random weight-norm activation gradient; do
        paca train --selection $s --max-steps 1 --output /tmp/sel-$s
    done
    python scripts/selection_overlap.py /tmp/sel-*/adapter
"""

import argparse
import collections
import re
from pathlib import Path

from safetensors.torch import load_file

from paca.adapters import ADAPTER_WEIGHTS

# BERT-style layer names (the default model of paca train); other models' layers match none
GROUPS = {
    "q, k, v, intermediate (read the residual stream)": re.compile(
        r"(attention\.self\.(query|key|value)|intermediate\.dense)\.idx$"
    ),
    "attention.output.dense": re.compile(r"attention\.output\.dense\.idx$"),
    "output.dense (FFN down)": re.compile(r"layer\.\d+\.output\.dense\.idx$"),
}


def overlap(indices: list[list[int]], top: int = 8) -> dict:
    counts = collections.Counter(i for row in indices for i in row)
    picks = sum(len(row) for row in indices)
    return {
        "layers": len(indices),
        "picks": picks,
        "distinct": len(counts),
        "top_share": sum(n for _, n in counts.most_common(top)) / picks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="+", type=Path, help="adapter folders (paca save)")
    args = parser.parse_args()
    print("| adapter | layers | picks | distinct channels | 8 most-picked channels' share |")
    print("|---|---|---|---|---|")
    for folder in args.adapters:
        tensors = load_file(folder / ADAPTER_WEIGHTS)
        for group, pattern in GROUPS.items():
            rows = [t.tolist() for k, t in sorted(tensors.items()) if pattern.search(k)]
            if rows:
                o = overlap(rows)
                print(
                    f"| {folder} {group} | {o['layers']} | {o['picks']} | {o['distinct']} "
                    f"| {100 * o['top_share']:.0f}% |"
                )


if __name__ == "__main__":
    main()
