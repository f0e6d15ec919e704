"""Process group, device, DDP/FSDP2 wrapping, mixed precision, compile, and the A100 rule."""

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lingua_sweep.config import DistributedConfig
from lingua_sweep.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FSDP_TYPES = ("no_shard", "full_shard")


@dataclass(kw_only=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: DistributedConfig, environ=os.environ) -> DistEnv:
    """Starts the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if cfg.fsdp_type not in FSDP_TYPES:
        raise UserError(f"distributed.fsdp_type={cfg.fsdp_type!r}: choose one of {FSDP_TYPES}")
    if cfg.model_dtype not in DTYPES:
        raise UserError(
            f"distributed.model_dtype={cfg.model_dtype!r}: choose one of {list(DTYPES)}"
        )
    world_size = int(environ.get("WORLD_SIZE", 1))
    rank = int(environ.get("RANK", 0))
    local_rank = int(environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(
            backend=backend, device_id=device if device.type == "cuda" else None
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def gpu_name(device: torch.device) -> str | None:
    """The accelerator's name, or None on CPU. Tests substitute this to emulate an A100."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def apply_a100_rule(batch_size: int, grad_acc_steps: int, name: str | None) -> tuple[int, int]:
    """A100s (40/80 GB) fit half the per-GPU batch of an H100: keep the effective batch equal."""
    if name is None or "A100" not in name:
        return batch_size, grad_acc_steps
    if batch_size % 2:
        raise UserError(f"data.batch_size={batch_size} must be even to halve it on an A100")
    log.info(
        "A100 detected (%s): batch %d -> %d, grad_acc %d -> %d",
        name,
        batch_size,
        batch_size // 2,
        grad_acc_steps,
        grad_acc_steps * 2,
    )
    return batch_size // 2, grad_acc_steps * 2


def parallelize(model: nn.Module, cfg: DistributedConfig, env: DistEnv) -> nn.Module:
    """Compile per block, then shard (full_shard) or replicate (no_shard) with FSDP2.

    FSDP2's `fully_shard` on a 1-D mesh shards; on a 2-D (replicate, shard=1) mesh it is plain
    data parallelism with the same API, so both modes share one code path for mixed precision,
    gradient sync control and DCP state dicts. FSDP1 is avoided: its full_shard broke on 2.7.1.
    """
    if cfg.compile:
        # Per-block, in place (torchtitan): small graphs reused across identical blocks, and
        # parameter names unchanged so checkpoints load with compile on or off.
        for block in model.layers.values():
            block.compile()
    if env.world_size == 1:
        return model  # mixed precision comes from `autocast`; nothing to shard or sync

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = _device_mesh(cfg, env)
    mp_policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[cfg.model_dtype], reduce_dtype=torch.float32
    )
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model


def _device_mesh(cfg: DistributedConfig, env: DistEnv):
    from torch.distributed.device_mesh import init_device_mesh

    if cfg.fsdp_type == "full_shard":
        return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(
        env.device.type, (env.world_size, 1), mesh_dim_names=("replicate", "shard")
    )


def autocast(cfg: DistributedConfig, env: DistEnv):
    """Mixed precision of a single process: there FSDP2 (and its policy) is not used."""
    if env.world_size > 1 or cfg.model_dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=DTYPES[cfg.model_dtype])


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Skip gradient all-reduce/reduce-scatter on non-final micro-steps of accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.is_cuda else dist.ReduceOp.SUM)
        if not value.is_cuda:  # gloo has no AVG
            value /= env.world_size
    return value


def any_rank(flag: bool, env: DistEnv) -> bool:
    if env.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
