"""One process of a multi-process PaCA run on CPU (gloo); started by tests/test_distributed.py
through torchrun or accelerate launch, and called in-process for the single-process reference.

Trains an adapted tiny LLaMA for a few AdamW steps on a fixed global batch of 4 sequences,
each process taking its share, and writes the final deltas (full tensors) from rank 0.

    torchrun --nproc_per_node 2 tests/distributed_worker.py --engine ddp --out deltas.pt
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402

import paca  # noqa: E402

GLOBAL_BATCH, SEQ, STEPS = 4, 12, 3


def batches(rank: int, world: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 96, (STEPS, GLOBAL_BATCH, SEQ), generator=generator)
    share = GLOBAL_BATCH // world
    return [step[rank * share : (rank + 1) * share] for step in ids]


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def train(
    engine, mode, rank=0, world=1, accelerator=None, drop=0.0, per="step", save=None
) -> dict[str, torch.Tensor]:
    """The final deltas; ``engine``: None (one process), ddp, fsdp or accelerate; ``drop``: a
    DropBP rate (0: none), its patterns drawn ``per`` step or micro-batch."""
    model = paca.enable(tiny_llama(), r=4, alpha=8, mode=mode, seed=1).train()
    if drop:
        paca.drop_backward(model, rate=drop, seed=3, per=per)
    forward = model
    if engine == "ddp":
        forward = torch.nn.parallel.DistributedDataParallel(model)
    elif engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    if accelerator is not None:
        forward, optimizer = accelerator.prepare(model, optimizer)
    for ids in batches(rank, world):
        loss = forward(input_ids=ids, labels=ids).loss
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if engine == "fsdp" and save is not None:  # every process takes part in the gather
        paca.save_adapter(model, f"{save}-rank{rank}")
    return {name: full(layer.delta) for name, layer in paca.paca_layers(model)}


def leave() -> None:
    """Ends a worker process at once, files written and output flushed, without the
    interpreter's teardown. torch 2.13/2.14 stash a Python object (a contextvars.Context) in
    the thread-local state that every collective issued inside a backward captures (DDP's
    all-reduces); a gloo thread that drops such a work last takes the GIL to release it, and
    one that does so while the interpreter is finalizing aborts the process ("terminate called
    without an active exception", SIGABRT; a core dump shows ~AsyncWork ->
    ~ThreadLocalState -> gil_scoped_acquire -> pthread_exit). destroy_process_group does not
    stop those threads (the group outlives it once DDP has used it). Seen in 1 of 25 to 1 of 80
    runs of this worker alone, more often with two at once; never in what the tests check."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["ddp", "fsdp", "accelerate"], required=True)
    parser.add_argument("--mode", default="merged")
    parser.add_argument("--out", required=True)
    parser.add_argument("--drop-backward", type=float, default=0.0)
    parser.add_argument("--drop-per", default="step")
    parser.add_argument("--save", default=None, help="fsdp: paca.save_adapter to SAVE-rankN")
    args = parser.parse_args()
    accelerator = None
    if args.engine == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        rank, world = accelerator.process_index, accelerator.num_processes
    else:
        torch.distributed.init_process_group("gloo")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != 2:
        raise SystemExit(f"expected 2 processes, got {world}")
    deltas = train(
        args.engine,
        args.mode,
        rank,
        world,
        accelerator,
        args.drop_backward,
        args.drop_per,
        args.save,
    )
    if rank == 0:
        torch.save(deltas, args.out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    leave()


if __name__ == "__main__":
    main()
