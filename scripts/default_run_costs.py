"""Where the default ``paca train`` run's time and memory go, piece by piece: the held-out pass
with full-vocabulary logits (as before) against logits at the answer positions only (as now),
the greedy-generation pass that exact match used to need, and a training step each way.

Each piece runs in a fresh process that loads SmolLM2-135M-Instruct (fp32, PaCA r 8 as the
default run), so its peak resident memory is that piece's plus the loaded model's; times are
medians over ``--rounds`` (the training steps alternate between the two ways in one process).

    python scripts/default_run_costs.py --rounds 3 > costs.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import statistics
import time


def _setup():
    import torch
    import transformers

    import paca
    from paca.recipes import train
    from paca.recipes.train.data import CausalCollator, Examples

    cfg = train.TrainConfig()
    path = train.default_model_path("chat")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    rows = train.split_rows(train.chat_rows(train.embedded.embedded_rows()), 0)
    data = train.chat_data(rows, tokenizer, cfg)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    paca.enable(model, r=cfg.r, alpha=cfg.alpha, seed=0, device="cpu")
    items = list(data["test"].items)
    random.Random(0).shuffle(items)  # the run's sample of the test split
    held_out = Examples(items[: cfg.eval_examples], answers=True)
    return model, tokenizer, data["train"], held_out, CausalCollator(tokenizer.pad_token_id)


def _full_logits_pass(model, dataset, collator):
    """The held-out pass as it was: the model's own loss from (batch, tokens, vocab) logits."""
    import torch

    with torch.no_grad():
        for start in range(0, len(dataset), 64):
            batch = collator(dataset.items[start : start + 64])
            out = model(**batch)
            out.logits[:, :-1].argmax(-1)


def _greedy_pass(model, tokenizer, dataset):
    """Exact match as it was: 8 greedy tokens for each prompt, left-padded batches of 25."""
    import torch

    from paca.recipes.generate import greedy

    pad = tokenizer.pad_token_id
    for start in range(0, len(dataset), 25):
        chunk = [e["input_ids"][: e["answer_start"]] for e in dataset.items[start : start + 25]]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        greedy(model, tokenizer, ids, mask, 8)


def _piece(name: str, rounds: int, queue) -> None:
    import torch

    from paca.recipes.train.evaluation import held_out_scores
    from paca.recipes.train.loss import answer_loss, scored_logits_only

    model, tokenizer, train_set, held_out, collator = _setup()
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (KiB counted)
    times: dict[str, list[float]] = {}

    def timed(key, fn):
        started = time.perf_counter()
        fn()
        times.setdefault(key, []).append(time.perf_counter() - started)

    model.eval()
    for _ in range(rounds):
        if name == "held-out pass, full logits":
            timed(name, lambda: _full_logits_pass(model, held_out, collator))
        elif name == "held-out pass, answer logits":
            timed(name, lambda: held_out_scores(model, held_out, collator))
        elif name == "greedy pass":
            timed(name, lambda: _greedy_pass(model, tokenizer, held_out))
    if name == "training steps":
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=5e-3, fused=True)

        def step(batch, selected):
            if selected:
                rest = {k: v for k, v in batch.items() if k != "labels"}
                with scored_logits_only(model, batch["labels"]):
                    loss = answer_loss(model(**rest), batch["labels"])
            else:
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        order = list(range(len(train_set)))
        random.Random(0).shuffle(order)
        for k in range(rounds + 1):  # the first round warms up, untimed
            for selected in (False, True):
                picks = order[(2 * k + selected) * 8 : (2 * k + selected + 1) * 8]
                batch = collator([train_set[i] for i in picks])
                started = time.perf_counter()
                step(batch, selected)
                if k:
                    key = "training step, " + ("answer logits" if selected else "full logits")
                    times.setdefault(key, []).append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put({"piece": name, "model_loaded_gib": round(loaded, 2),
               "peak_rss_gib": round(peak, 2),
               "seconds": {k: round(statistics.median(v), 2) for k, v in times.items()},
               "all_seconds": {k: [round(x, 2) for x in v] for k, v in times.items()}})  # fmt: skip


PIECES = (
    "held-out pass, answer logits",
    "held-out pass, full logits",
    "greedy pass",
    "training steps",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pieces", default=";".join(PIECES), help="names, separated by ;")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = []
    for name in args.pieces.split(";"):
        queue = context.Queue()
        process = context.Process(target=_piece, args=(name, args.rounds, queue))
        process.start()
        results.append(queue.get())
        process.join()
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
