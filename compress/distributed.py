"""Data-parallel training under ``torchrun``: the same command, N processes.

``torchrun --no-python --nproc_per_node=N compress train-prune ...`` starts N copies; each
reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment, joins one process group
(NCCL on CUDA, Gloo on CPU), trains a DistributedDataParallel copy of the model on its own
shard of every batch, and only rank 0 writes the run directory. ``--batch-size`` is per
process, so one step sees ``N x batch-size`` images, exactly the batch a single process
with ``--batch-size N x B`` would see (the shards of a step are interleaved slices of the
same shuffled order). Masks are computed from weights that DDP keeps identical on every
rank, and the final masks are checked to agree. A method that changes the network while it
trains (``density``, ``dpf-filter``) decides each cut once, in process 0, and every process
applies that decision (`from_first_process`); the DistributedDataParallel wrapper is then
rebuilt around the thinner model, and the final weights are checked to agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from compress.errors import CompressError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Shard()


def from_env() -> Shard:
    """The shard torchrun describes in the environment (a single process without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise CompressError("RANK and WORLD_SIZE must be integers (as torchrun sets "
                            "them)") from None
    if world < 1 or not 0 <= rank < world:
        raise CompressError(f"RANK {rank} does not fit WORLD_SIZE {world}")
    return Shard(rank, world)


def is_main_process() -> bool:
    """True outside torchrun and on rank 0: the process that prints and writes."""
    return os.environ.get("RANK", "0") in ("", "0")


def start(shard: Shard, device_name: str) -> torch.device:
    """Join the process group (if there is more than one process); the device to use."""
    device = device_for(shard, device_name)
    if shard.active and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def device_for(shard: Shard, device_name: str) -> torch.device:
    """This process's device: under torchrun with CUDA, the GPU of its local rank."""
    cuda = device_name.startswith("cuda")
    if not shard.active:
        return torch.device(device_name)
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not torch.cuda.is_available():
            raise CompressError("--device cuda asked for, but torch sees no CUDA device")
        if local >= torch.cuda.device_count():
            raise CompressError(f"process {local} of this machine has no GPU of its own: "
                                f"{torch.cuda.device_count()} visible; lower --nproc_per_node")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return device


def stop(shard: Shard) -> None:
    if shard.active and dist.is_initialized():
        dist.destroy_process_group()


def agree(shard: Shard, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed, so that none waits for the others forever."""
    if not shard.active:
        if error is not None:
            raise error
        return
    failed = _to_backend(torch.tensor([0 if error is None else 1], dtype=torch.int64))
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(failed.item()):
        raise CompressError("another process of this torchrun job failed; see its message")


def from_first_process(compute: Callable[[], T]) -> T:
    """``compute()`` as process 0 computes it, in every process: a decision made once
    (which channels a cut removes) and applied everywhere; the other processes do not
    compute it. Outside torchrun, ``compute()`` itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(shard: Shard, values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over all processes (the values themselves alone)."""
    if not shard.active:
        return values
    tensor = _to_backend(torch.tensor(values, dtype=torch.float64))
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def add_across_processes(shard: Shard, tensor: torch.Tensor) -> None:
    """Replace ``tensor`` in place by its sum over all processes (itself alone)."""
    if not shard.active:
        return
    moved = _to_backend(tensor)
    dist.all_reduce(moved)
    if moved is not tensor:
        tensor.copy_(moved)


def broadcast_buffers(shard: Shard, model: torch.nn.Module) -> None:
    """Every buffer (BatchNorm's running statistics) as process 0 has it, in every process:
    what DistributedDataParallel does before each forward, done once more after the last
    step, so that the model evaluated, checked and saved is the same everywhere."""
    if not shard.active:
        return
    for buffer in model.buffers():
        moved = _to_backend(buffer.data)
        dist.broadcast(moved, src=0)
        if moved is not buffer.data:
            buffer.data.copy_(moved)


def check_identical(shard: Shard, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Fail loudly if ``tensors`` differ between processes (compared by checksum)."""
    if not shard.active:
        return
    checksum = sum(float(t.double().sum()) + float((t.double() ** 2).sum())
                   for t in tensors.values())
    extremes = []
    for op in (dist.ReduceOp.MIN, dist.ReduceOp.MAX):
        value = _to_backend(torch.tensor([checksum], dtype=torch.float64))
        dist.all_reduce(value, op=op)
        extremes.append(float(value.item()))
    if extremes[0] != extremes[1]:
        raise CompressError(f"the {what} differ between torchrun processes")


def _to_backend(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor
