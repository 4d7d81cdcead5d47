"""Processes, devices and data parallelism (torchrun's environment, DDP, FSDP2).

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them the run is a single
process. Parallelism is applied to the finished model by :func:`parallelize`, toggled by the
config and never woven into the model (torchtitan's habit).
"""

from __future__ import annotations

import datetime
import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from unigen.configuration import ConfigError
from unigen.model.host_collectives import host_group as shared_host_group

from .config import DistributedConfig, RunConfig


@dataclass
class DistEnv:
    """Where this process stands: its rank, the world, and the device it computes on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool = False
    """True when :func:`init_distributed` created the process group (and so tears it down)."""
    host_group: object | None = None
    """A gloo group beside an NCCL default group, for the host-side flags every step checks
    (:func:`any_rank`): a CPU all-reduce reads nothing back from the GPU. None when the default
    group is gloo already."""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """The device of a one-process run: ``"auto"`` is the GPU when there is one, else the CPU;
    any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(dcfg: DistributedConfig, rcfg: RunConfig) -> DistEnv:
    """Read torchrun's environment, pick the device and start the process group (NCCL on
    GPUs, gloo on CPUs) when there is more than one process. Reuses a group that is already up."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    if rcfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is 'cuda' but this machine has no usable CUDA device "
                          "(torch.cuda.is_available() is False); use run.device=auto or cpu",
                          kind="invalid")
    use_cuda = rcfg.device == "cuda" or (rcfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} "
                               f"CUDA devices are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = dcfg.backend if dcfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
        if backend == "nccl" and not use_cuda:
            raise ValueError("distributed.backend 'nccl' needs CUDA; use 'gloo' on CPUs")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=dcfg.timeout_minutes), **kwargs)
        owns = True
    elif dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    host_group = None
    if world > 1 and dist.get_backend() != "gloo":  # every rank makes it (a collective)
        host_group = shared_host_group()  # the one the model's pair counts travel on too
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device,
                   owns_process_group=owns, host_group=host_group)


def teardown_distributed(env: DistEnv | None) -> None:
    """Destroy the process group if this code created it."""
    if env is not None and env.owns_process_group and dist.is_initialized():
        # Free what still holds the group's work (a DDP reducer inside a reference cycle of the
        # trainer) while the group is alive: freed at interpreter exit instead, gloo's worker
        # threads can abort the process ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()
        env.owns_process_group = False


def parallelize(model: nn.Module, dcfg: DistributedConfig,
                env: DistEnv) -> tuple[nn.Module, list[nn.Parameter]]:
    """The module the training step calls — the model itself (one process), DDP, or the model
    sharded in place with FSDP2 ``fully_shard`` — and the parameters left replicated outside
    FSDP, whose gradients the trainer averages itself (:func:`average_gradients`)."""
    if not env.is_distributed:
        return model, []
    if dcfg.parallelism == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=dcfg.find_unused_parameters,
            bucket_cap_mb=dcfg.bucket_cap_mb), []
    from torch.distributed.fsdp import fully_shard

    # One FSDP unit per transformer block (decoder blocks, Q-Former layers, ViT and XLM-R
    # layers: every nn.ModuleList's children), then the root, which keeps the tied
    # embedding/LM head, the projections and the temperature together.
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(True for _ in block.parameters()):
                    fully_shard(block, reshard_after_forward=dcfg.fsdp_reshard_after_forward)
    # FSDP2 cannot shard 0-d parameters (the learnable temperature): keep them replicated.
    scalars = [p for p in model.parameters() if p.dim() == 0 and p.requires_grad]
    fully_shard(model, reshard_after_forward=dcfg.fsdp_reshard_after_forward,
                ignored_params=set(scalars) or None)
    return model, scalars


def average_gradients(params: list[nn.Parameter], env: DistEnv) -> None:
    """Average the gradients of parameters that no DDP/FSDP wrapper synchronises."""
    if not env.is_distributed:
        return
    for p in params:
        if p.grad is None:  # unused on this rank: contribute zeros so every rank agrees
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= env.world_size


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm (clipped to ``max_norm`` when finite), for plain tensors and for
    FSDP2's sharded DTensor gradients mixed with replicated plain ones."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    plain = [g for g in grads if not hasattr(g, "full_tensor")]
    total = torch.nn.utils.get_total_norm(sharded, foreach=True).full_tensor() ** 2
    if plain:
        total = total + torch.nn.utils.get_total_norm(plain, foreach=True).to(total.device) ** 2
    total = total.sqrt()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(
            [p for p in params if p.grad is not None and hasattr(p.grad, "full_tensor")],
            max_norm, total, foreach=True)
        torch.nn.utils.clip_grads_with_norm_(
            [p for p in params if p.grad is not None and not hasattr(p.grad, "full_tensor")],
            max_norm, total, foreach=True)
    return total


def unwrap(module: nn.Module) -> nn.Module:
    """The model under DDP / torch.compile wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.is_distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is True on any rank (so all ranks stop together)."""
    if not env.is_distributed:
        return flag
    # On the host (the gloo side group under NCCL): checked every step, it must not wait on
    # the GPU's queue of work.
    on_host = env.host_group is not None or env.device.type == "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32,
                     device="cpu" if on_host else env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.host_group)
    return bool(t.item())


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not env.is_distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, dcfg: DistributedConfig,
                     env: DistEnv) -> tuple[dict | None, dict | None]:
    """Unsharded CPU copies of the model and optimizer state, on rank 0 (None elsewhere).
    Under FSDP every rank must call this (the parameters are gathered)."""
    if env.is_distributed and dcfg.parallelism == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
        return (msd, osd) if env.is_main else (None, None)
    if not env.is_main:
        return None, None
    msd = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return msd, optimizer.state_dict()


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict,
                          optim_sd: dict, dcfg: DistributedConfig, env: DistEnv) -> None:
    """Load unsharded state dicts (as :func:`full_state_dicts` saved them) on every rank."""
    if env.is_distributed and dcfg.parallelism == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        return
    unwrap(model).load_state_dict(model_sd, strict=True)
    optimizer.load_state_dict(optim_sd)


def save_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Every rank writes its own shards of the model and optimizer state into ``path`` through
    ``torch.distributed.checkpoint`` (FSDP2 parameters stay sharded; a replicated model is
    written once, deduplicated across ranks). Call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(unwrap(model), optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=path)


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Read a :func:`save_sharded_state` checkpoint into the (sharded or replicated) model and
    optimizer, each rank its own shards. Call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    m = unwrap(model)
    msd, osd = get_state_dict(m, optimizer)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(m, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
