"""The training loop: config in, final validation loss out.

Everything is built by `build_*` factories from the typed config; the loop itself only steps,
logs, evaluates, checkpoints and watches for preemption. Host syncs happen only at logging,
evaluation and checkpoint steps (and, across ranks, a preemption poll every 10 steps), so the GPU
is never stalled by bookkeeping.

Resume is exact: a checkpoint holds model, optimizer and a `TrainState` (step, scheduler, data
position, the running loss/out window) plus RNG, so an interrupted fp32 run logs bitwise the
losses of an uninterrupted one, and metrics.jsonl is cut back to the checkpoint's step before
the run continues it. SIGUSR2 (Slurm's warning) or SIGTERM: finish the step, checkpoint, raise
`Preempted` (`train.py` exits 75; under submitit the agent chains to submitit's requeue handler).

A run owns its directory: rank 0 holds a flock on `.lock` in it for the whole run, so a second
run there fails at once instead of interleaving checkpoints and metrics. The lock dies with its
process, so a rerun, a requeued job or a restarted worker group takes it over.
"""

import fcntl
import json
import logging
import math
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import OmegaConf

from lingua_sweep import checkpoint, distributed, gpus, memory, metrics, model, optim
from lingua_sweep.config import TrainConfig
from lingua_sweep.data import (
    build_train_loader,
    build_val_batches,
    data_identity,
    resolve_data_paths,
)
from lingua_sweep.errors import UserError
from lingua_sweep.preflight import preflight
from lingua_sweep.tokenizer import build_tokenizer, check_vocab_size

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


class NonFiniteLossError(UserError):
    """Divergence (too high an lr, mostly): a one-line error, never a checkpoint of it."""


class Preempted(Exception):  # noqa: N818 - a signal, not an error
    """Raised after the preemption checkpoint is written; the job should be requeued."""

    def __init__(self, step: int, signum: int, previous_handler):
        super().__init__(
            f"preempted by {signal.Signals(signum).name} at step {step}; "
            "checkpoint saved, rerun the same command to resume"
        )
        self.step = step
        self.signum = signum
        # The handler installed before ours (submitit's requeue handler under submitit).
        self.previous_handler = previous_handler


def job_id_from_env(environ=os.environ) -> str:
    """Slurm's id (array jobs as submitit names them), else an id for a local run."""
    if "SLURM_ARRAY_JOB_ID" in environ:
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or f"local{os.getpid()}"


class PreemptionWatcher:
    """Turns SIGUSR2 (Slurm's warning, sent by submitit's --signal) and SIGTERM into a flag.

    The loop polls the flag at step boundaries, checkpoints, then raises `Preempted` carrying
    the handler installed before (submitit's, which requeues the job), so both cooperate.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: preemption signals are not handled")
            return  # Python only lets the main thread install signal handlers
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("received %s: stopping after this step", signal.Signals(signum).name)
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass(kw_only=True)
class Batches:
    loader: object
    val: list
    micro_batch_size: int
    grad_acc_steps: int


def run_dir_of_hydra() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def lock_run_dir(run_dir: Path) -> IO:
    """Takes `run_dir`'s lock for this process (creating the directory); UserError naming the
    holder's pid and host when another run has it. Closing the returned file releases it."""
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Held past this function, for the run. "a+": the holder's note stays readable.
        lock = open(path, "a+", encoding="utf-8")  # noqa: SIM115
    except OSError as e:
        raise metrics.output_error(path, e) from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        try:
            holder = json.loads(lock.read())
            who = f"pid {holder['pid']} on host {holder['host']}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        lock.close()
        raise UserError(
            f"run directory {run_dir} is in use by another run ({who}); wait for it to end, "
            "stop it, or choose another hydra.run.dir"
        ) from None
    except OSError as e:  # a filesystem without locks (some network mounts): run unguarded
        log.warning("cannot lock %s (%s); not guarded against a second run", path, e.strerror)
    try:
        lock.truncate(0)
        lock.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        lock.flush()
    except OSError as e:
        lock.close()
        raise metrics.output_error(path, e) from e
    return lock


def _lock_for_all_ranks(run_dir: Path, env: distributed.DistEnv) -> IO | None:
    # One holder, rank 0: the ranks of one torchrun share the directory. The outcome is agreed
    # so that every rank of a second run stops, not just its rank 0.
    lock, error = None, None
    if env.is_main:
        try:
            lock = lock_run_dir(run_dir)
        except UserError as e:
            error = e
    if distributed.any_rank(error is not None, env):
        raise error or UserError(f"rank 0 could not lock run directory {run_dir} (see its error)")
    return lock


def run(cfg, *, run_dir: Path | None = None, environ=os.environ) -> float:
    """Trains per `cfg` (a composed DictConfig or a TrainConfig); returns the final val loss."""
    tc: TrainConfig = OmegaConf.to_object(cfg) if not isinstance(cfg, TrainConfig) else cfg
    preflight(tc)
    run_dir = run_dir or run_dir_of_hydra()
    env = distributed.init_distributed(tc.distributed, environ)
    lock = None
    try:
        # Before data, tokenizer and model: a config too big for this device is a one-line error
        # now, instead of an OOM kill (with no message at all on CPU) minutes into the run.
        if tc.distributed.memory_check:
            gpu = distributed.gpu_name(env.device)
            memory.check_local(
                tc, device=env.device, gpu=gpu, world_size=env.world_size, environ=environ
            )
        distributed.check_same_run_dir(run_dir, env)
        lock = _lock_for_all_ranks(run_dir, env)
        return train(tc, run_dir=run_dir, env=env, job_id=job_id_from_env(environ))
    finally:
        if lock is not None:
            lock.close()
        distributed.shutdown()


def _prepare_data(tc: TrainConfig, env: distributed.DistEnv, gpu: str | None) -> Batches:
    # First, before anything heavy: missing data is a one-line error naming data.root.
    resolve_data_paths(tc.data, cluster=tc.cluster.name)
    batch_size, grad_acc = tc.data.batch_size, tc.optim.grad_acc_steps
    if tc.distributed.a100_halve_batch:
        batch_size, grad_acc = distributed.apply_a100_rule(batch_size, grad_acc, gpu)
    tokenizer = build_tokenizer(tc.data.tokenizer)
    tc.model.vocab_size = check_vocab_size(tc.model.vocab_size, tokenizer)
    loader = build_train_loader(
        tc.data, tokenizer, rank=env.rank, world_size=env.world_size, batch_size=batch_size
    )
    # Validation covers the same tokens whatever the A100 rule did to the micro-batch size, so
    # loss/val compares across clusters.
    val_batches = max(tc.logging.val_loss_batches, 1) * tc.data.batch_size // batch_size
    val = build_val_batches(
        tc.data,
        tokenizer,
        n_batches=val_batches,
        rank=env.rank,
        world_size=env.world_size,
        batch_size=batch_size,
    )
    return Batches(loader=loader, val=val, micro_batch_size=batch_size, grad_acc_steps=grad_acc)


@torch.no_grad()
def evaluate(net, batches, tc: TrainConfig, env: distributed.DistEnv) -> float:
    net.eval()
    total = torch.zeros((), device=env.device)
    for inputs, targets in batches:
        with distributed.autocast(tc.distributed, env):
            total += net(inputs.to(env.device), targets.to(env.device)).float()
    net.train()
    return distributed.all_reduce_mean(total / len(batches), env).item()


@dataclass(kw_only=True)
class TrainState:
    """What a checkpoint restores besides weights, optimizer and RNG (lingua's TrainState).

    The running loss/out window is part of it, so a run resumed mid-window logs the same
    loss/out as one never interrupted.
    """

    step: int = 0  # the last step done
    loss_sum: torch.Tensor  # on the device: summed every micro-step without a host sync
    steps_in_window: int = 0
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Any

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "loss_sum": self.loss_sum.item(),
            "steps_in_window": self.steps_in_window,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.loss_sum.fill_(state.get("loss_sum", 0.0))
        self.steps_in_window = state.get("steps_in_window", 0)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["data"])


@dataclass(kw_only=True)
class Trainer:
    """Everything the loop works with, built once by `train`."""

    tc: TrainConfig
    env: distributed.DistEnv
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: Batches
    ckpt: checkpoint.Checkpointer
    logger: metrics.MetricLogger
    throughput: metrics.Throughput
    watcher: PreemptionWatcher
    state: TrainState


def _start_run_files(tc: TrainConfig, run_dir: Path, resumed_step: int | None) -> None:
    """Rank 0: the resolved config, and metrics.jsonl cut back to the resumed step (emptied
    when starting over), so its steps stay unique and increasing whatever was killed when."""
    path = run_dir / "config.yaml"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(tc), path)
    except OSError as e:
        raise metrics.output_error(path, e) from e
    last = -1 if resumed_step is None else resumed_step
    metrics.truncate_metrics(run_dir / "metrics.jsonl", last)
    # Which data this run saw, so results never compare runs on different data silently.
    (run_dir / metrics.DATA_FILE).write_text(json.dumps(data_identity(tc.data)) + "\n")


def train(tc: TrainConfig, *, run_dir: Path, env: distributed.DistEnv, job_id: str) -> float:
    torch.manual_seed(tc.seed)
    gpu = distributed.gpu_name(env.device)
    data = _prepare_data(tc, env, gpu)

    net = model.build_model(tc.model)
    net.init_weights(tc.seed)
    net.to(env.device)
    flops_per_token = model.flops_per_token(tc.model, tc.data.seq_len)
    net = distributed.parallelize(net, tc.distributed, env)
    param_bytes = distributed.local_param_bytes(net)  # now: a forward unshards FSDP's root
    optimizer = optim.build_optimizer(net, tc.optim)
    scheduler = optim.build_scheduler(optimizer, tc.optim, tc.steps)
    state = TrainState(
        loss_sum=torch.zeros((), dtype=torch.float32, device=env.device),
        scheduler=scheduler,
        loader=data.loader,
    )

    ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", env, keep=tc.checkpoint.dump.keep)
    resumed = ckpt.load_latest(model=net, optimizer=optimizer)
    if resumed is not None:
        state.load_state_dict(resumed)

    identity = metrics.RunIdentity(
        experiment=tc.name,
        cluster=tc.cluster.name,
        provider=tc.cluster.provider,
        gpu_type=_short_gpu_name(gpu) or tc.cluster.gpu_type,
        job_id=job_id,
    )
    if env.is_main:
        _start_run_files(tc, run_dir, None if resumed is None else state.step)
    logger = metrics.MetricLogger(tc, run_dir, identity, rank=env.rank)
    throughput = metrics.Throughput(
        flops_per_token=flops_per_token,
        peak_flops_per_s=metrics.peak_flops(gpu),
        world_size=env.world_size,
    )
    watcher = PreemptionWatcher()
    trainer = Trainer(
        tc=tc,
        env=env,
        net=net,
        optimizer=optimizer,
        data=data,
        ckpt=ckpt,
        logger=logger,
        throughput=throughput,
        watcher=watcher,
        state=state,
    )
    exit_code = 1
    try:
        if state.step == 0:
            logger.log(
                0,
                {
                    "loss/init": evaluate(net, data.val, tc, env),
                    "params": model.count_params(net),
                    # rank 0's share: the full model under no_shard, 1/world under full_shard
                    "param_bytes_local": param_bytes,
                    "gpu": gpu or "cpu",
                    "world_size": env.world_size,
                    "micro_batch_size": data.micro_batch_size,
                    "grad_acc_steps": data.grad_acc_steps,
                },
            )
        # A finished run started again has nothing left to train.
        final_val = evaluate(net, data.val, tc, env) if state.step >= tc.steps else _loop(trainer)
        exit_code = 0
        return final_val
    except Preempted:
        exit_code = 0
        raise
    finally:
        watcher.restore()
        logger.close(exit_code=exit_code)
        close = getattr(data.loader, "close", None)
        if close:
            close()


def _short_gpu_name(gpu: str | None) -> str | None:
    if gpu is None:
        return None
    return next((key for key in gpus.GPUS if key in gpu), gpu)


# Across ranks the preemption poll is a collective with a host sync: not every step.
PREEMPTION_POLL_EVERY = 10


def _loop(t: Trainer) -> float:
    tc, env, net, data, state = t.tc, t.env, t.net, t.data, t.state
    tokens_per_step = data.micro_batch_size * tc.data.seq_len * data.grad_acc_steps
    last_val = math.nan

    def check_finite(value: float, step: int, what: str = "loss") -> None:
        if not math.isfinite(value):
            good = t.ckpt.last_good()  # collective: every rank gets here together
            raise NonFiniteLossError(
                f"{what} is {value} at step {step} (lr {state.scheduler.get_last_lr()[0]:.3g}); "
                f"training stopped, last good checkpoint kept: "
                f"{good.name if good else 'none written'}; lower optim.lr or raise optim.warmup"
            )

    def check_savable(step: int) -> None:
        """Never checkpoint a diverged model: one sync here is cheap next to the save."""
        check_finite(distributed.all_reduce_mean(loss.detach().clone(), env).item(), step)
        if not distributed.all_finite(net.parameters(), env):
            check_finite(math.nan, step, what="a parameter")

    for step in range(state.step + 1, tc.steps + 1):
        for micro in range(data.grad_acc_steps):
            inputs, targets = next(data.loader)
            inputs = inputs.to(env.device, non_blocking=True)
            targets = targets.to(env.device, non_blocking=True)
            distributed.set_grad_sync(net, micro == data.grad_acc_steps - 1)
            with distributed.autocast(tc.distributed, env):
                loss = net(inputs, targets) / data.grad_acc_steps
            loss.backward()
            state.loss_sum += loss.detach()
        grad_norm = None
        if tc.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), tc.optim.grad_clip)
        t.optimizer.step()
        state.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.throughput.add(tokens_per_step)
        state.step = step
        state.steps_in_window += 1

        last = step == tc.steps
        if metrics.every_n_steps(step, tc.logging.freq) or last:
            window = state.loss_sum / state.steps_in_window
            loss_out = distributed.all_reduce_mean(window, env).item()
            check_finite(loss_out, step)
            record = {
                "loss/out": loss_out,
                "lr": state.scheduler.get_last_lr()[0],
                **t.throughput.measure(),
            }
            if grad_norm is not None:
                norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                record["grad_norm"] = norm.item()
            skipped = getattr(data.loader, "skipped_lines", 0)
            if skipped:
                record["data/skipped_lines"] = skipped
            t.logger.log(step, record)
            state.loss_sum.zero_()
            state.steps_in_window = 0
        if metrics.every_n_steps(step, tc.logging.val_loss_every) or last:
            last_val = evaluate(net, data.val, tc, env)
            check_finite(last_val, step, what="val loss")
            t.logger.log(step, {"loss/val": last_val})
            t.throughput.reset()
        if metrics.every_n_steps(step, tc.checkpoint.eval.every):
            check_savable(step)
            t.ckpt.save_eval(step=step, model=net)
        poll = (
            env.world_size == 1
            or metrics.every_n_steps(step, tc.logging.freq)
            or metrics.every_n_steps(step, PREEMPTION_POLL_EVERY)
        )
        preempted = poll and not last and distributed.any_rank(t.watcher.signum is not None, env)
        if metrics.every_n_steps(step, tc.checkpoint.dump.every) or preempted:
            check_savable(step)
            t.ckpt.save(step=step, model=net, optimizer=t.optimizer, train_state=state.state_dict())
            t.throughput.reset()
        if preempted:
            signum = t.watcher.signum or signal.SIGUSR2  # another rank got the signal
            raise Preempted(step, signum, t.watcher.previous.get(signum))
    return last_val
