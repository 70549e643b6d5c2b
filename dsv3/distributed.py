"""Data-parallel training across processes: `DataParallel` (process group, DDP wrapper, per-step reductions).

`torchrun --nproc-per-node=N -m dsv3 train ...` starts N copies of the trainer; torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) tells each one its place. `DataParallel.setup()`
returns None without it (or with WORLD_SIZE=1), and the trainer then never touches torch.distributed.
With it: one process per device (nccl on CUDA, gloo on CPU), the model wrapped in DDP (gradients averaged
over ranks), and one all-reduce per step for what every rank must agree on: the logged losses (global
mean) and the routed-slot counts behind the aux-loss-free bias update (global expert load, DeepSeek-V3 §2.1.2).
Does not shard parameters or optimizer state (that is FSDP2's `fully_shard`), nor split a sequence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def world_size_from_env() -> int:
    """Processes in the run as torchrun announces them (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DataParallel:
    rank: int
    world_size: int
    device: torch.device  # this rank's device (cuda:LOCAL_RANK on GPUs)
    owns_group: bool  # this object created the process group (and destroys it in close())

    @classmethod
    def setup(cls, device: torch.device) -> DataParallel | None:
        """Join torchrun's process group; None for a single-process run (no distributed code at all)."""
        world = world_size_from_env()
        if world <= 1:
            return None
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":  # one GPU per process, picked by the rank within this node
            device = torch.device("cuda", local_rank if device.index is None else device.index)
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world, device, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> DistributedDataParallel:
        """DDP: gradients are averaged over ranks in buckets during backward. Every parameter takes part
        in every step (stacked expert weights get a (zero) gradient even for an expert with no tokens),
        so no find_unused_parameters. forward_sync_buffers=False: rank 0 must not overwrite the other ranks'
        step_load counts each forward; the router biases stay equal because every rank applies the same
        global update (buffers are still synced once, at construction, when all of them are equal anyway)."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)

    def reduce_step(self, sums: torch.Tensor, model) -> torch.Tensor:
        """One all-reduce per step: the per-rank mean losses -> the global mean (returned), and each gate's
        step_load -> the global routed-slot count (written back, so update_router_bias() sees the global load)."""
        loads = [m.gate.step_load for m in model.moe_layers(mtp=True)]
        flat = torch.cat([sums.to(self.device), *loads])
        dist.all_reduce(flat)
        start = sums.numel()
        for load in loads:
            load.copy_(flat[start:start + load.numel()])
            start += load.numel()
        return (flat[:sums.numel()] / self.world_size).to(sums.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (Ctrl-C or the time limit seen by one rank stops all)."""
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
