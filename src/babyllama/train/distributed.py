"""Data parallelism, kept apart from the model and the loop's arithmetic.

A stage runs unchanged under `torchrun --nproc_per_node=N` (or `accelerate launch`, which sets the
same RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR variables). `DistEnv` reads them, joins the
process group (NCCL on GPUs, gloo on CPUs) and wraps the model:

    ddp   DistributedDataParallel: every rank holds the whole model; gradients are all-reduced
          once per optimizer step (no_sync during accumulation).
    fsdp  FSDP2 `fully_shard` per block and at the root: parameters, gradients and optimizer state
          sharded across ranks; bf16 compute with float32 gradient reduction when training in bf16.

Checkpoints are gathered to full (unsharded) state dicts keyed by parameter name, so a run saved
by any number of ranks resumes on any other number.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- collectives that are no-ops in a single process --------------------------------------------

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on one (stopping must be agreed, or the others hang)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def distributed_env(device_type: str | None = None) -> DistEnv:
    """The environment of this process; joins the process group the first time it is called
    under a launcher. Safe to call again (stages and the loop both ask)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank)


def rank_device(device: torch.device, env: DistEnv) -> torch.device:
    """One GPU per process: rank's local GPU; CPUs are shared."""
    if env.enabled and device.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return device


def wrap_model(model: torch.nn.Module, mode: str, env: DistEnv, dtype: torch.dtype) -> torch.nn.Module:
    """The module the loop runs forward/backward on. `model` itself stays the one whose state we
    save (for FSDP2 it is sharded in place)."""
    if not env.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [env.local_rank] if next(model.parameters()).is_cuda else None
        return DDP(model, device_ids=device_ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        low = dtype if dtype in (torch.bfloat16, torch.float16) else None
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # embeddings, final norm, LM head (tied or not)
        return model
    raise ValueError(f"parallel={mode!r}: choose one of {', '.join(PARALLEL_MODES)}")


@contextmanager
def gradient_sync(wrapped: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if hasattr(wrapped, "no_sync"):  # DDP
        with (nullcontext() if sync else wrapped.no_sync()):
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """(model state, optimizer state) as full CPU tensors keyed by parameter name, on every rank
    (a collective: all ranks must call it)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return weights, optim


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict,
                    optim: dict | None, partial: bool = False) -> None:
    """Inverse of `full_state`, whatever the number of ranks that saved it (every rank loads).
    `partial`: `weights` are only the trained ones (an adapter's); the rest stay as they are."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, strict=not partial)
    set_model_state_dict(model, weights, options=opts)
    if optimizer is not None and optim is not None:
        if all(isinstance(k, int) for k in optim.get("state", {})):  # checkpoints from before v0.2
            optimizer.load_state_dict(optim)
        else:
            set_optimizer_state_dict(model, optimizer, optim, options=opts)
