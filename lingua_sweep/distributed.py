"""Process group, device, DDP/FSDP2 wrapping, mixed precision, compile, and the A100 rule.

Launch on one node with `torchrun --nproc_per_node=N train.py [overrides]` (gloo on CPU, nccl
on GPU). Every rank composes the Hydra config itself, so they must agree on the run directory,
whose default name holds `${now:...}`: see `torchrun_argv`.
"""

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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
    """Starts the process group under torchrun or a Slurm step of one task per rank.

    Only when WORLD_SIZE > 1; the rendezvous is bounded by `distributed.init_timeout_s`.
    """
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
        store = _rendezvous(rank, world_size, cfg.init_timeout_s, environ)
        # The collectives keep torch's default timeout (10 or 30 min): rank 0 alone may write
        # eval weights or build the corpus while the others wait in a barrier.
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore("default_pg", store),  # as init_process_group's own
            rank=rank,
            world_size=world_size,
            device_id=device if device.type == "cuda" else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _rendezvous(rank: int, world_size: int, timeout_s: float, environ) -> dist.Store:
    """Every rank meets at MASTER_ADDR:MASTER_PORT within `timeout_s`, or a UserError says why.

    Without a bound, a rank that cannot reach the master waits until the allocation ends.
    torch's own store connect overruns its timeout by a retry and logs C++ stack traces, so
    the other ranks first wait for the master's port here, with plain sockets.
    """
    addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    if not addr or not port:
        raise UserError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set: launch through "
            "torchrun or a Slurm job that sets them"
        )
    who = f"rank {rank} of {world_size}"
    knob = f"distributed.init_timeout_s={timeout_s:g}"
    deadline = time.monotonic() + timeout_s
    if rank > 0:
        _wait_for_master(addr, int(port), deadline, who, knob)
    else:
        _resolve(addr, int(port), who, knob)  # the master connects to its own store too
    host = f"[{addr}]" if ":" in addr else addr  # an IPv6 literal
    timeout = timedelta(seconds=timeout_s)
    try:
        store, _, _ = next(
            dist.rendezvous(f"tcp://{host}:{port}", rank, world_size, timeout=timeout)
        )
    except dist.DistError as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{who}: rendezvous at the torch master {addr}:{port} failed ({first_line}); "
            f"the limit is {knob}s"
        ) from None
    return store


def _wait_for_master(addr: str, port: int, deadline: float, who: str, knob: str) -> None:
    """Returns once a TCP connection to addr:port succeeds; UserError at the deadline."""
    while True:
        reason = _resolve(addr, port, who, knob)
        if reason is None:
            left = deadline - time.monotonic()
            try:
                with socket.create_connection((addr, port), timeout=max(0.1, min(left, 5.0))):
                    return
            except OSError as e:
                reason = e.strerror or str(e) or type(e).__name__
        if time.monotonic() >= deadline:
            raise UserError(
                f"{who} could not reach the torch master {addr}:{port} "
                f"(MASTER_ADDR:MASTER_PORT) within {knob}s: {reason}"
            )
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _resolve(addr: str, port: int, who: str, knob: str) -> str | None:
    """None if addr resolves; why not if that may pass (DNS down); UserError if it won't."""
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno == socket.EAI_AGAIN:
            return f"name lookup failed: {e.strerror}"
        # A typo, or a node name this machine cannot resolve: waiting would not help.
        raise UserError(
            f"{who}: the torch master {addr}:{port} (MASTER_ADDR:MASTER_PORT) does not "
            f"resolve ({e.strerror}); failing now instead of waiting {knob}s"
        ) from None
    return None


# --- one run directory for all torchrun ranks -------------------------------------------------

RUN_DIR_KEY = "lingua_sweep/run_dir"


def _torchrun_store(environ):
    """torchrun's own rendezvous store, or None outside torchrun (or with no shared store).

    torchrun serves a TCPStore at MASTER_ADDR:MASTER_PORT for the whole launch and tells its
    workers so with TORCHELASTIC_USE_AGENT_STORE; it outlives worker restarts.
    """
    if int(environ.get("WORLD_SIZE", 1)) <= 1:
        return None
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(
        environ["MASTER_ADDR"],
        int(environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(minutes=10),
    )


def torchrun_argv(argv: list[str], environ=os.environ) -> list[str]:
    """`argv` with the overrides that put every torchrun rank in rank 0's run directory.

    Rank 0 composes its run dir (`${now:...}` and all, the user's `hydra.run.dir` included) and
    publishes it in torchrun's store (`publish_run_dir`); the other ranks wait for it here,
    before composing, and take it as `hydra.run.dir`, so no rank creates a directory of its
    own. A restarted worker group (torchrun --max-restarts) finds the key already set and
    resumes in the same directory.
    """
    if any(a in ("-m", "--multirun") for a in argv):
        return argv
    store = _torchrun_store(environ)
    if store is None:
        return argv
    rank = int(environ["RANK"])
    if rank == 0 and not store.check([RUN_DIR_KEY]):
        return argv
    run_dir = store.get(RUN_DIR_KEY).decode()  # blocks until rank 0 has published it
    quoted = run_dir.replace("'", "\\'")  # Hydra's quoted string: any path, spaces and all
    extra = [f"hydra.run.dir='{quoted}'"]
    if rank > 0:
        extra.append("hydra.output_subdir=null")  # .hydra/ is rank 0's to write
    kept = [a for a in argv if not a.lstrip("+").startswith("hydra.run.dir=")]
    # Beside the other overrides: argparse rejects positionals split around options.
    first = next((i for i, a in enumerate(kept) if i and "=" in a and a[0] != "-"), len(kept))
    return [*kept[:first], *extra, *kept[first:]]


def publish_run_dir(run_dir: str | Path, environ=os.environ) -> None:
    """Rank 0's half of `torchrun_argv`; a no-op outside torchrun."""
    if int(environ.get("RANK", 0)) != 0:
        return
    store = _torchrun_store(environ)
    if store is not None:
        store.set(RUN_DIR_KEY, str(Path(run_dir).resolve()))


def check_same_run_dir(run_dir: Path, env: "DistEnv") -> None:
    """Ranks writing checkpoints to different directories would never resume: fail early."""
    if env.world_size == 1:
        return
    dirs: list = [None] * env.world_size
    dist.all_gather_object(dirs, str(Path(run_dir).resolve()))
    if len(set(dirs)) > 1:
        raise UserError(
            f"ranks disagree on the run directory ({sorted(set(dirs))}); "
            "pass hydra.run.dir=DIR to torchrun's command"
        )


# --- devices and the A100 rule ---------------------------------------------------------------


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
    Both meshes run on gloo too (CPU tests: 2 ranks match 1 rank to ~1e-6 in fp32). Blocks
    are compiled before they are wrapped, torchtitan's order.
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


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_param_bytes(model: nn.Module) -> int:
    """Parameter bytes held by this rank: all of them unsharded, ~1/world under full_shard."""
    return sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())


def all_finite(tensors, env: DistEnv) -> bool:
    """Whether every element of every tensor, on every rank, is finite (one host sync)."""
    flags = [torch.isfinite(_local(t)).all() for t in tensors]
    ok = bool(torch.stack(flags).all().item()) if flags else True
    return not any_rank(not ok, env)


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
