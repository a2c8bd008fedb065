"""Builds paca/recipes/data/stdlib_docstrings.jsonl.gz: which standard-library package a docstring
comes from, 10 classes, with a fixed train/validation/test split.

The docstrings are read with ``ast`` from the running CPython's standard library (nothing is
imported or executed). The shipped file was built from CPython 3.11.7; the docstrings are the
PSF's, under the licence in paca/recipes/data/LICENSE-PSF.txt.

    python scripts/build_stdlib_dataset.py
"""

import ast
import gzip
import json
import os
import random
import sys
from pathlib import Path

PACKAGES = [
    "asyncio", "distutils", "email", "http", "importlib",
    "logging", "multiprocessing", "tkinter", "unittest", "xml",
]  # fmt: skip
PER_CLASS = 200  # at most; http has fewer
MIN_CHARS, MAX_CHARS = 40, 600
SPLIT = {"train": 0.5, "validation": 0.15}  # the rest is test
OUT = Path(__file__).resolve().parents[1] / "paca" / "data" / "stdlib_docstrings.jsonl.gz"


def docstrings(package_dir: Path) -> list[str]:
    found = set()
    for path in sorted(package_dir.rglob("*.py")):
        if {"test", "tests"} & set(path.relative_to(package_dir).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS:
                    found.add(" ".join(doc.split())[:MAX_CHARS])
    return sorted(found)


def main() -> None:
    root = Path(os.__file__).parent
    rng = random.Random(0)
    rows = []
    for package in PACKAGES:
        docs = docstrings(root / package)
        rng.shuffle(docs)
        docs = docs[:PER_CLASS]
        n_train = round(len(docs) * SPLIT["train"])
        n_val = round(len(docs) * SPLIT["validation"])
        for i, text in enumerate(docs):
            split = "train" if i < n_train else "validation" if i < n_train + n_val else "test"
            rows.append({"text": text, "label": package, "split": split})
        print(f"{package:16s} {len(docs)}", file=sys.stderr)
    with gzip.open(OUT, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "validation", "test")}
    print(
        f"wrote {OUT}: {len(rows)} examples {counts} (Python {sys.version.split()[0]})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
