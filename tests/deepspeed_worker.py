"""One process of a DeepSpeed run on CPU (``DS_ACCELERATOR=cpu``, gloo); started by
tests/test_deepspeed.py through torchrun. Trains the adapted tiny LLaMA of
``distributed_worker`` with DeepSpeed's engine and optimizer on the same global batches, and
writes (rank 0) the final deltas and the trained model's logits on one batch.

    torchrun --nproc_per_node 2 tests/deepspeed_worker.py --stage 2 --mode additive --out d.pt
"""

import argparse
import sys
from pathlib import Path

import deepspeed
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402
from distributed_worker import GLOBAL_BATCH, batches, leave  # noqa: E402

import paca  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, choices=[2, 3], required=True)
    parser.add_argument("--mode", default="additive")
    parser.add_argument("--sync", action="store_true", help="paca.sync_weights after each step")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)  # set by some launchers
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.stage},
        # torch's AdamW with distributed_worker's settings (lr 1e-2, weight decay 0.01)
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True},
        },
    }
    model = paca.enable(tiny_llama(), r=4, alpha=8, mode=args.mode, seed=1).train()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    for ids in batches(rank, world):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        if args.sync:
            paca.sync_weights(model)
    deltas = {}
    for name, layer in paca.paca_layers(model):
        with deepspeed.zero.GatheredParameters([layer.delta], enabled=args.stage == 3):
            deltas[name] = layer.delta.detach().clone()
    with torch.no_grad():
        logits = engine(input_ids=batches(0, 1)[0]).logits
    if rank == 0:
        torch.save({"deltas": deltas, "logits": logits}, args.out)
    torch.distributed.barrier()
    leave()  # the same teardown race as distributed_worker's


if __name__ == "__main__":
    main()
