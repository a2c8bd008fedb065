"""How much of a QPaCA update would survive re-quantizing the merged weight to 4 bits.

``paca.merge`` merges a QPaCA adapter into a dequantized (floating-point) copy of each adapted
layer and never re-quantizes. This script measures what re-quantizing would cost, on an
adapter trained by ``paca train --quantize 4bit`` (bitsandbytes nf4 base):

* per layer: the merged weight ``W1 = W0 + update`` (``W0`` the dequantized nf4 base) is
  quantized again with the base's own nf4 settings; of the update, how much is kept
  (projection onto the update), the error left, and how many updated entries fall back onto
  exactly their old value;
* end to end: test accuracy of the adapted model, of the merged model (dequantized, what
  ``paca.merge`` gives), of the re-quantized merged model and of the quantized base with the
  trained head but without the columns (``paca.disabled``).

    paca train --quantize 4bit --output /tmp/q4
    python scripts/requantize_study.py --adapter /tmp/q4 [--json docs/results/requantize.json]
"""

import argparse
import json
from pathlib import Path

import torch
import transformers

import paca
from paca import quant
from paca.recipes.loading import dtype_argument
from paca.recipes.train import (
    DEFAULT_DATA,
    TrainConfig,
    classification_data,
    default_model_path,
    read_rows,
    split_rows,
)
from paca.targets import HEAD_NAMES


def requantized(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W0, W1, W1 re-quantized) of one adapted nf4/fp4 layer, float32, shape (out, in)."""
    import bitsandbytes.functional as F

    base = layer.base_layer
    state = base.weight.quant_state
    w0 = quant.dequantize(base, torch.float32)
    w1 = w0.clone()
    idx = layer.active.idx
    w1[:, idx] += layer.active.scaling * layer.active.delta.detach().float()
    packed, new_state = F.quantize_4bit(w1, blocksize=state.blocksize, quant_type=state.quant_type)
    return w0, w1, F.dequantize_4bit(packed, new_state).float()


@torch.no_grad()
def accuracy(model, data, collator, batch_size=64) -> float:
    model.eval()
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collator)
    right = total = 0
    for batch in loader:
        labels = batch.pop("labels")
        right += (model(**batch).logits.argmax(-1) == labels).sum().item()
        total += len(labels)
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="output folder of paca train --quantize")
    parser.add_argument("--model", default=None, help="base model (default: all-MiniLM-L6-v2)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    adapter = Path(args.adapter)
    adapter = adapter / "adapter" if (adapter / "adapter").is_dir() else adapter
    model_path = args.model or str(default_model_path())

    config = transformers.AutoConfig.from_pretrained(adapter)  # the head's labels
    labels = [config.id2label[i] for i in range(config.num_labels)]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(labels),
        quantization_config=quant.bnb_config("4bit", skip=list(HEAD_NAMES)),
        **dtype_argument(torch.float32),
    )
    paca.load_adapter(model, adapter)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    rows = split_rows(read_rows(DEFAULT_DATA), 0)
    test = classification_data(
        {"test": rows["test"]}, tokenizer, TrainConfig(task="classification"), labels
    )["test"]
    collator = transformers.DataCollatorWithPadding(tokenizer)

    layers, totals = [], {"update": 0.0, "kept": 0.0, "error": 0.0, "entries": 0, "same": 0}
    new_weights = {}
    for name, layer in paca.paca_layers(model):
        w0, w1, wq = requantized(layer)
        update, got = w1 - w0, wq - w0
        norm2 = update.pow(2).sum().item()
        kept = (got * update).sum().item() / norm2
        error = (got - update).norm().item() / norm2**0.5
        cols = layer.active.idx
        same = (wq[:, cols] == w0[:, cols]).sum().item()
        entries = w0[:, cols].numel()
        layers.append({"layer": name, "kept": kept, "error": error, "unchanged": same / entries})
        totals["update"] += norm2
        totals["kept"] += (got * update).sum().item()
        totals["error"] += (got - update).pow(2).sum().item()
        totals["entries"] += entries
        totals["same"] += same
        new_weights[name] = wq

    result = {
        "adapter": str(adapter),
        "layers": len(layers),
        "kept": totals["kept"] / totals["update"],
        "error": (totals["error"] / totals["update"]) ** 0.5,
        "unchanged": totals["same"] / totals["entries"],
        "per_layer": layers,
        "test_examples": len(test),
    }
    result["acc_adapted"] = accuracy(model, test, collator)
    with paca.disabled(model):
        result["acc_base_with_head"] = accuracy(model, test, collator)
    merged = paca.merge(model)
    result["acc_merged"] = accuracy(merged, test, collator)
    for name, weight in new_weights.items():
        merged.get_submodule(name).weight.data.copy_(weight)
    result["acc_requantized"] = accuracy(merged, test, collator)

    print(f"{len(layers)} adapted nf4 layers; re-quantizing the merged weights to nf4:")
    print(f"  update kept (projection):         {result['kept']:.1%}")
    print(f"  error left (relative to update):  {result['error']:.1%}")
    print(f"  updated entries back on old value: {result['unchanged']:.1%}")
    print(f"test accuracy on {len(test)} examples:")
    for key in ("acc_adapted", "acc_merged", "acc_requantized", "acc_base_with_head"):
        print(f"  {key[4:]:<16} {result[key]:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
