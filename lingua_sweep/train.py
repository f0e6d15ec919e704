"""The training loop: config in, final validation loss out.

Everything is built by `build_*` factories from the typed config; the loop itself only steps,
logs, evaluates, checkpoints and watches for preemption. Host syncs happen only at logging,
evaluation and checkpoint steps (and, across ranks, a preemption poll every 10 steps), so the GPU
is never stalled by bookkeeping.

Resume is exact: a checkpoint holds model, optimizer, scheduler, data position, RNG and the
running loss/out window, so an interrupted fp32 run logs bitwise the losses of an uninterrupted
one. SIGUSR2 (Slurm's warning) or SIGTERM: finish the step, checkpoint, raise `Preempted`
(`train.py` exits 75; under submitit the agent chains to submitit's requeue handler).
"""

import json
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lingua_sweep import checkpoint, corpus, distributed, metrics, model, optim
from lingua_sweep.config import TrainConfig
from lingua_sweep.data import build_train_loader, build_val_batches, resolve_data_paths
from lingua_sweep.errors import UserError
from lingua_sweep.tokenizer import TOKENIZERS, build_tokenizer, check_vocab_size

log = logging.getLogger(__name__)

# Vocab sizes known without a tokenizer file, so a launcher can check them before submitting.
KNOWN_VOCAB_SIZES = {"cl100k": 100277, "bytes": 258}


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


def preflight(cfg: TrainConfig) -> None:
    """Config mistakes that need no data or GPU, raised before any job is submitted."""
    for registry, name, key in [
        (optim.OPTIMIZERS, cfg.optim.optimizer, "optim.optimizer"),
        (optim.SCHEDULERS, cfg.optim.scheduler, "optim.scheduler"),
        (model.NORMS, cfg.model.norm, "model.norm"),
        (model.ACTIVATIONS, cfg.model.activation, "model.activation"),
        (model.POSEMBEDS, cfg.model.posembed, "model.posembed"),
        (TOKENIZERS, cfg.data.tokenizer.name, "data.tokenizer.name"),
    ]:
        if name not in registry:
            raise UserError(f"{key}={name!r} is not registered; choose one of {registry.names()}")
    if cfg.distributed.fsdp_type not in distributed.FSDP_TYPES:
        raise UserError(
            f"distributed.fsdp_type={cfg.distributed.fsdp_type!r}: "
            f"choose one of {distributed.FSDP_TYPES}"
        )
    if cfg.distributed.model_dtype not in distributed.DTYPES:
        raise UserError(
            f"distributed.model_dtype={cfg.distributed.model_dtype!r}: "
            f"choose one of {list(distributed.DTYPES)}"
        )
    if cfg.model.dim % cfg.model.n_heads:
        raise UserError(
            f"model.dim={cfg.model.dim} is not divisible by model.n_heads={cfg.model.n_heads}"
        )
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise UserError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    known = KNOWN_VOCAB_SIZES.get(cfg.data.tokenizer.name)
    if known and cfg.model.vocab_size not in (None, known):
        raise UserError(
            f"model.vocab_size={cfg.model.vocab_size} does not match tokenizer "
            f"{cfg.data.tokenizer.name!r} ({known}); set model.vocab_size=null to auto-fill"
        )
    if cfg.model.n_layers < 1:
        raise UserError(f"model.n_layers={cfg.model.n_layers} must be at least 1")
    if cfg.steps <= 0:
        raise UserError(f"steps={cfg.steps} must be positive")
    if cfg.optim.grad_acc_steps < 1:
        raise UserError(f"optim.grad_acc_steps={cfg.optim.grad_acc_steps} must be >= 1")


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


def run(cfg, *, run_dir: Path | None = None, environ=os.environ) -> float:
    """Trains per `cfg` (a composed DictConfig or a TrainConfig); returns the final val loss."""
    tc: TrainConfig = OmegaConf.to_object(cfg) if not isinstance(cfg, TrainConfig) else cfg
    preflight(tc)
    run_dir = run_dir or run_dir_of_hydra()
    env = distributed.init_distributed(tc.distributed, environ)
    try:
        distributed.check_same_run_dir(run_dir, env)
        return train(tc, run_dir=run_dir, env=env, job_id=job_id_from_env(environ))
    finally:
        distributed.shutdown()


def _prepare_data(tc: TrainConfig, env: distributed.DistEnv, gpu: str | None) -> Batches:
    if not tc.cluster.slurm and env.is_main:
        corpus.ensure_embedded_corpus(tc.data)  # the `local` cluster ships no data: build it
    distributed.barrier(env)
    resolve_data_paths(tc.data)
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


def _truncate_metrics(path: Path, last_step: int) -> None:
    """A resumed run recomputes steps after its checkpoint: drop their stale records."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


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

    ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", env, keep=tc.checkpoint.dump.keep)
    resumed = ckpt.load_latest(model=net, optimizer=optimizer)
    start = {"step": 0, "loss_sum": 0.0, "steps_in_window": 0}
    if resumed is not None:
        start.update({k: resumed[k] for k in start if k in resumed})
        scheduler.load_state_dict(resumed["scheduler"])
        data.loader.load_state_dict(resumed["data"])

    identity = metrics.RunIdentity(
        experiment=tc.name,
        cluster=tc.cluster.name,
        provider=tc.cluster.provider,
        gpu_type=_short_gpu_name(gpu) or tc.cluster.gpu_type,
        job_id=job_id,
    )
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(tc), run_dir / "config.yaml")
        if resumed is not None:
            _truncate_metrics(run_dir / "metrics.jsonl", start["step"])
    logger = metrics.MetricLogger(tc, run_dir, identity, rank=env.rank)
    throughput = metrics.Throughput(
        flops_per_token=flops_per_token,
        peak_flops_per_s=metrics.peak_flops(gpu),
        world_size=env.world_size,
    )
    watcher = PreemptionWatcher()
    exit_code = 1
    try:
        if start["step"] == 0:
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
        if start["step"] >= tc.steps:  # a finished run started again: nothing left to train
            final_val = evaluate(net, data.val, tc, env)
        else:
            final_val = _loop(
                tc, net, optimizer, scheduler, data, ckpt, logger, throughput, watcher, env, start
            )
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
    return next((key for key in metrics.PEAK_BF16_FLOPS if key in gpu), gpu)


# Across ranks the preemption poll is a collective with a host sync: not every step.
PREEMPTION_POLL_EVERY = 10


def _loop(
    tc, net, optimizer, scheduler, data, ckpt, logger, throughput, watcher, env, start: dict
) -> float:
    tokens_per_step = data.micro_batch_size * tc.data.seq_len * data.grad_acc_steps
    # The running loss/out window is part of the resumable state, so a run resumed mid-window
    # logs the same loss/out as one never interrupted.
    loss_sum = torch.tensor(start["loss_sum"], dtype=torch.float32, device=env.device)
    steps_in_window = start["steps_in_window"]
    last_val = math.nan

    def train_state(step: int) -> dict:
        return {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "data": data.loader.state_dict(),
            "loss_sum": loss_sum.item(),
            "steps_in_window": steps_in_window,
        }

    def check_finite(value: float, step: int, what: str = "loss") -> None:
        if not math.isfinite(value):
            kept = checkpoint.complete_checkpoints(ckpt.root)
            raise NonFiniteLossError(
                f"{what} is {value} at step {step} (lr {scheduler.get_last_lr()[0]:.3g}); "
                f"training stopped, last good checkpoint kept: "
                f"{kept[0].name if kept else 'none written'}; lower optim.lr or raise "
                "optim.warmup"
            )

    def check_savable(step: int) -> None:
        """Never checkpoint a diverged model: one sync here is cheap next to the save."""
        check_finite(distributed.all_reduce_mean(loss.detach().clone(), env).item(), step)
        if not distributed.all_finite(net.parameters(), env):
            check_finite(math.nan, step, what="a parameter")

    for step in range(start["step"] + 1, tc.steps + 1):
        for micro in range(data.grad_acc_steps):
            inputs, targets = next(data.loader)
            inputs = inputs.to(env.device, non_blocking=True)
            targets = targets.to(env.device, non_blocking=True)
            distributed.set_grad_sync(net, micro == data.grad_acc_steps - 1)
            with distributed.autocast(tc.distributed, env):
                loss = net(inputs, targets) / data.grad_acc_steps
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = None
        if tc.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), tc.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        throughput.add(tokens_per_step)
        steps_in_window += 1

        last = step == tc.steps
        if metrics.every_n_steps(step, tc.logging.freq) or last:
            loss_out = distributed.all_reduce_mean(loss_sum / steps_in_window, env).item()
            check_finite(loss_out, step)
            record = {
                "loss/out": loss_out,
                "lr": scheduler.get_last_lr()[0],
                **throughput.measure(),
            }
            if grad_norm is not None:
                norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                record["grad_norm"] = norm.item()
            skipped = getattr(data.loader, "skipped_lines", 0)
            if skipped:
                record["data/skipped_lines"] = skipped
            logger.log(step, record)
            loss_sum.zero_()
            steps_in_window = 0
        if metrics.every_n_steps(step, tc.logging.val_loss_every) or last:
            last_val = evaluate(net, data.val, tc, env)
            check_finite(last_val, step, what="val loss")
            logger.log(step, {"loss/val": last_val})
            throughput.reset()
        if metrics.every_n_steps(step, tc.checkpoint.eval.every):
            check_savable(step)
            ckpt.save_eval(step=step, model=net)
        poll = (
            env.world_size == 1
            or metrics.every_n_steps(step, tc.logging.freq)
            or metrics.every_n_steps(step, PREEMPTION_POLL_EVERY)
        )
        preempted = poll and not last and distributed.any_rank(watcher.signum is not None, env)
        if metrics.every_n_steps(step, tc.checkpoint.dump.every) or preempted:
            check_savable(step)
            ckpt.save(step=step, model=net, optimizer=optimizer, train_state=train_state(step))
            throughput.reset()
        if preempted:
            signum = watcher.signum or signal.SIGUSR2  # another rank got the signal
            raise Preempted(step, signum, watcher.previous.get(signum))
    return last_val
