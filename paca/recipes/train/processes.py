"""This run's place among the processes a launcher started, read from the environment."""

from __future__ import annotations

import os

import torch

# where launchers put the process count and this process's rank: torchrun, accelerate and
# DeepSpeed's launcher (WORLD_SIZE, RANK), Open MPI (Optimum-Habana's gaudi_spawn.py --use_mpi),
# MPICH/Intel MPI and MVAPICH: the names accelerate reads too
WORLD_SIZE_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


def launcher_env(names: tuple[str, ...], default: int) -> int:
    """The first of ``names`` set in the environment, as an int; else ``default``."""
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def is_main_process() -> bool:
    """Rank 0 of a launcher's processes, or no launcher (read from the environment)."""
    return launcher_env(RANK_ENV, 0) == 0


class Processes:
    """This run's place among the processes a launcher started (``torchrun``,
    ``accelerate launch``, several machines: ``RANK``/``WORLD_SIZE`` in the environment); one
    process without one. The main process alone writes files and prints; the others wait at
    ``barrier``."""

    def __init__(self, device: torch.device):
        self.state = None
        self.rank, self.world = 0, 1
        self.device = device
        if launcher_env(WORLD_SIZE_ENV, 1) > 1:
            from accelerate import PartialState

            # the process group the Trainer then uses (gloo on CPUs, nccl on GPUs); on a CPU
            # accelerate starts no group unless told it is one
            self.state = PartialState(cpu=device.type == "cpu")
            self.rank, self.world = self.state.process_index, self.state.num_processes
            # an accelerator: this process's own (cuda:LOCAL_RANK). Not on CPUs: accelerate
            # says "cpu:0" there, and checkpoints tagged so do not load in torch.load
            if device.type != "cpu":
                self.device = self.state.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (a CPU tensor in, a CPU tensor out)."""
        if self.state is None:
            return values
        device = self.state.device  # nccl reduces on the GPU
        summed = values.to(device)
        torch.distributed.all_reduce(summed)
        return summed.cpu()

    def say(self, message: str) -> None:
        """A line of the run's own (precision, batch) on stdout, from the main process."""
        if self.main:
            print(f"paca train: {message}", flush=True)

    def gather(self, items: list) -> list[list]:
        """Every process's ``items``, by rank."""
        if self.state is None:
            return [items]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, items)
        return out
