"""Data-parallel training with torch.distributed, as torchrun (or Kubeflow Trainer, which runs torchrun) starts it:
the process group, each rank's device, its share of a global batch, and DDP around a family's trained networks.

Outside torchrun everything here is a no-op: one process, rank 0 of 1.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes checkpoints, sample grids, metrics and the saved model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """Whether torchrun started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks()


def start(timeout_s: float) -> Ranks:
    """Joins the process group torchrun prepared (NCCL on GPUs, gloo on CPUs), once per process. A collective
    that waits longer than ``timeout_s`` (a rank stuck or gone) fails the rank instead of hanging it."""
    if not launched() or dist.is_initialized():
        return current()
    gpus = torch.cuda.is_available()
    if gpus:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if gpus else "gloo", timeout=timedelta(seconds=timeout_s))
    return current()


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def device_of(ranks: Ranks, device: torch.device) -> torch.device:
    """Each rank on its own GPU of the node (``LOCAL_RANK``); CPU ranks share the CPU."""
    if ranks.distributed and device.type == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return device


def share(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s consecutive rows of a tensor drawn for the global batch."""
    if len(tensor) % world:
        raise ValueError(f"a global batch of {len(tensor)} does not split over {world} ranks: make train.batch_size "
                         f"a multiple of {world}, and at most the number of training images")
    rows = len(tensor) // world
    return tensor[rank * rows : (rank + 1) * rows]


def share_batch(batch: Any, rank: int, world: int, size: int) -> Any:
    """This rank's part of a batch of ``training_batches``: every tensor whose first dimension is the global
    batch ``size`` is shared out (in dicts, tuples and dataclasses too); anything else is every rank's."""
    if isinstance(batch, torch.Tensor):
        return share(batch, rank, world) if batch.dim() and len(batch) == size else batch
    if isinstance(batch, dict):
        return {key: share_batch(value, rank, world, size) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(share_batch(value, rank, world, size) for value in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: share_batch(getattr(batch, f.name), rank, world, size)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def batch_size_of(batch: Any) -> int | None:
    """The leading dimension of the first tensor in a batch (the global batch size as drawn)."""
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.dim() else None
    values = (batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list))
              else [getattr(batch, f.name) for f in dataclasses.fields(batch)] if dataclasses.is_dataclass(batch)
              else ())
    for value in values:
        if (size := batch_size_of(value)) is not None:
            return size
    return None


def ddp_wrapper(device: torch.device):
    """How each trained network is wrapped: torch's DistributedDataParallel on this rank's device. Buffers are
    not broadcast at each forward: a GAN calls its critic several times per step, and a broadcast between the
    calls would change BatchNorm statistics that backward still needs (``train.sync_batchnorm`` keeps them
    equal instead)."""
    from torch.nn.parallel import DistributedDataParallel

    def wrap(module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       forward_sync_buffers=False, find_unused_parameters=find_unused_parameters)

    return wrap


def sync_batchnorm(module: nn.Module, device: torch.device) -> None:
    """Every BatchNorm of ``module`` as a SyncBatchNorm (statistics over the global batch), in place."""
    if device.type != "cuda":
        raise ValueError("train.sync_batchnorm needs GPU ranks (torch's SyncBatchNorm runs on CUDA only); "
                         "set it to false for CPU ranks, where each rank normalises its own share of the batch")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise ValueError("a network that is one BatchNorm layer cannot be converted in place")
    nn.SyncBatchNorm.convert_sync_batchnorm(module)  # replaces the BatchNorms inside, keeping their state


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (every rank calls this with the same keys)."""
    if not current().distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return dict(zip(keys, (tensor.cpu() / dist.get_world_size()).tolist()))


class DataParallelSteps:
    """The data-parallel part of the generator contract (``base.Generator`` inherits it): the trainer calls
    ``distribute``; ``train_step`` runs its trained networks through ``parallel`` and draws its noise with ``randn``
    / ``randint``, so that R ranks with batch b take the step one process takes with batch R·b."""

    rank: int
    world: int
    _parallel: dict[int, nn.Module]

    def distribute(self, wrap: Callable[..., nn.Module], rank: int, world: int) -> None:
        """Trains as rank ``rank`` of ``world``: each network with trained parameters is wrapped (``wrap``: DDP;
        it takes ``find_unused_parameters``) for ``parallel`` to return. Families whose step leaves some trained
        parameters unused, or runs a network through a method other than ``forward``, wrap what they call."""
        self.rank, self.world = rank, world
        for module in self.networks().values():
            if any(parameter.requires_grad for parameter in module.parameters()):
                self._parallel[id(module)] = wrap(module)

    def parallel(self, module: nn.Module) -> nn.Module:
        """``module`` as ``train_step`` calls it: through its data-parallel wrapper once distributed (the
        gradients are averaged over the ranks), else itself."""
        return self._parallel.get(id(module), module)

    def randn(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal noise of this rank's ``shape`` (batch first): its rows of the draw for the global batch,
        so the ranks together draw what one process drawing the global batch would."""
        noise = torch.randn((shape[0] * self.world, *shape[1:]), device=device, dtype=dtype)
        return share(noise, self.rank, self.world)

    def randint(self, high: int, count: int, device: torch.device) -> torch.Tensor:
        """``count`` integers in ``[0, high)``: this rank's of the draw for the global batch (as ``randn``)."""
        return share(torch.randint(0, high, (count * self.world,), device=device), self.rank, self.world)

    def share_batch(self, batch: Any, size: int) -> Any:
        """This rank's part of a global batch of ``size`` from ``training_batches``."""
        return share_batch(batch, self.rank, self.world, size)
