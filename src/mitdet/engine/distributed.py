"""torchrun / DistributedDataParallel helpers: only rank 0 writes files and prints."""
from __future__ import annotations

import datetime
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


# How long a collective waits for the other ranks: validation runs on rank 0 alone (a full COCO val can take
# well over the default 10 minutes) while the others wait at the next collective.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(nproc_per_node: int, argv: list[str] | None = None) -> None:
    """Replace this process by `python -m torch.distributed.run --standalone --nproc_per_node N <argv>`.

    Called by the stage when `train.nproc_per_node > 1` and not yet under torchrun, so dvc.yaml's command
    stays `python stages/train.py --backbone b`. torchrun forwards SIGINT/SIGTERM to the workers.
    """
    argv = list(sys.argv if argv is None else argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def init(device: torch.device) -> Dist:
    """Join the process group torchrun describes (nccl on CUDA, gloo otherwise); single process otherwise."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist()
    info = Dist(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                local_rank=int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return info


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module, info: Dist, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the model when running with more than one process."""
    if not info.enabled:
        return model
    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    # MiT's depthwise kernels [C, 1, 3, 3]: the gradient's stride on the size-1 dim differs from the bucket's,
    # which is the same memory layout; DDP warns about it every step otherwise
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place; the tensor itself when single-process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank 0's Python object on every rank (e.g. a validation result)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's Python object, in rank order (`[obj]` when single-process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
