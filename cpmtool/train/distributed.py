"""Data parallelism across processes started by `torchrun` (gloo on CPU, nccl on CUDA).

    torchrun --nproc-per-node 2 -m cpmtool train-rl ...

Each rank rolls out its share of the prompts, the samples are gathered so that every rank holds
the whole batch (rewards, filters and advantages are then computed identically everywhere), and
each rank back-propagates its share of every mini-batch through DistributedDataParallel, whose
gradient average, with losses normalised by the global token count times the world size, equals
the single-process gradient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def shard(self, items: list) -> list:
        """This rank's contiguous share of `items` (sizes differ by at most one)."""
        n = len(items)
        lo = self.rank * n // self.world
        hi = (self.rank + 1) * n // self.world
        return items[lo:hi]

    def gather(self, obj) -> list:
        """`obj` from every rank, in rank order (a list of one element without torchrun)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: str = "cpu") -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if str(device) == "cuda":
        # one GPU per rank: a bare "cuda" (and every .to("cuda")) then means this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())


def close_distributed(dist: Dist) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_ddp(model, dist: Dist):
    """`model` under DistributedDataParallel when distributed; the model itself otherwise."""
    if not dist.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(model)
