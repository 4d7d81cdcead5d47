"""Integers the ranks exchange between their hosts (how many pairs each holds this step).

Every rank knows its own counts on the host (the batch's shapes); the other ranks' counts need a
collective. Over NCCL that collective would run on the device and be read back, a host–device
synchronisation per step; over gloo it is a message between the hosts, and the GPU's queue keeps
running. So such integers go over a gloo group: the default group when it is gloo already (CPU
training), else one gloo group beside it, made once per default group and shared with the
trainer (``unigen.training.distributed``). Making it is a collective: every rank must call
:func:`host_group` the first time in the same order, which holds because every rank initialises
the same way and runs the same step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_CACHE: dict = {}


def host_group():
    """The gloo group for host-side collectives (``None`` = the default group, gloo itself)."""
    if dist.get_backend() == "gloo":
        return None
    default = dist.distributed_c10d._get_default_group()
    if _CACHE.get("default") is not default:  # a new default group: a new host group beside it
        _CACHE["default"], _CACHE["group"] = default, dist.new_group(backend="gloo")
    return _CACHE["group"]


def all_gather_host_ints(value: int) -> list[int]:
    """``value`` of every rank, in rank order, exchanged between the hosts (no device read)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"all_gather_host_ints: value must be an int, got {type(value).__name__}")
    group = host_group()
    mine = torch.tensor([value], dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return torch.cat(every).tolist()  # host memory: no synchronisation
