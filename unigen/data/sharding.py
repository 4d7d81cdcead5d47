"""Which slice of a data set this process reads: one shard per (rank, DataLoader worker).

Every stream splits its input across ``world_size * num_workers`` shards so that no sample is
read twice and none is lost. The shard is resolved when iteration starts (inside the worker
process), from explicit arguments, else ``torch.distributed``, else the ``RANK``/``WORLD_SIZE``
variables torchrun sets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` out of ``count`` (``index = rank * num_workers + worker``)."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"ShardSpec.count must be a positive int, got {self.count!r}")
        if not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ValueError(f"ShardSpec.index must be in [0, {self.count}), got {self.index!r}")

    @classmethod
    def from_rank_worker(cls, rank: int, world_size: int, worker: int = 0,
                         num_workers: int = 1) -> "ShardSpec":
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_workers < 1 or not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} is not in [0, num_workers={num_workers})")
        return cls(index=rank * num_workers + worker, count=world_size * num_workers)


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else torchrun's env vars."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # torch is optional for the pure-data tools
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_shard(rank: int | None = None, world_size: int | None = None) -> ShardSpec:
    """The shard of the calling process, combining the rank with the DataLoader worker id."""
    if rank is None or world_size is None:
        env_rank, env_world = distributed_rank_world()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    worker, num_workers = 0, 1
    try:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is not None:
            worker, num_workers = info.id, info.num_workers
    except ImportError:
        pass
    return ShardSpec.from_rank_worker(rank, world_size, worker, num_workers)
