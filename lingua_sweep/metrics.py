"""Where metrics go: metrics.jsonl always (rank 0), WandB when configured; plus MFU.

metrics.jsonl holds one JSON object per line, each with `step`. A kill can tear the last line, so
readers skip lines that don't parse (`read_metrics`), and a run cuts the file back to the step it
resumes from before appending (`truncate_metrics`): steps in it are always increasing.

WandB naming follows the team's convention so runs line up across clusters:
run name `{experiment}_{cluster}_{job_id}`, group `{experiment}/{cluster}`,
tags `[provider, cluster, gpu_type, experiment, job_{job_id}]`.
"""

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lingua_sweep.config import TrainConfig
from lingua_sweep.errors import UserError
from lingua_sweep.gpus import gpu_spec

log = logging.getLogger("lingua_sweep.train")
DATA_FILE = "data.json"  # in a run dir: the data it read (lingua_sweep.data.data_identity)


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s per GPU of a device name (`gpus.GPUS`); None on CPU."""
    spec = gpu_spec(device_name)
    return spec.peak_bf16_flops if spec else None


def every_n_steps(step: int, freq: int) -> bool:
    """True every `freq` steps; never for freq <= 0 (the old fork's `x % -1 == 0` bug)."""
    return freq > 0 and step % freq == 0


# --- metrics.jsonl -------------------------------------------------------------------------


def parse_records(text: str | None) -> list[dict[str, Any]]:
    """metrics.jsonl's records in file order: the one parser of the format. Skipped: lines torn
    by a kill (or the line a running job is writing now), NUL padding, anything that is not an
    object with a non-negative integer `step`."""
    out = []
    for line in (text or "").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if type(step) is int and step >= 0:
            out.append(record)
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file ([] when there is none)."""
    try:
        return parse_records(Path(path).read_bytes().decode("utf-8", errors="replace"))
    except FileNotFoundError:
        return []


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keeps the records up to `last_step` (-1: none), so a resumed or restarted run continues
    the file without repeating steps; invalid lines go too. Atomic: a kill keeps the old file."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)
    except OSError as e:
        raise output_error(path, e) from e


def output_error(path: Path, error: BaseException) -> UserError:
    """A one-line UserError for a failed write of `path`, with the operating system's reason.

    Some writers (torch.save, DCP) lose the errno of a full disk in their own RuntimeError, so
    without one a filesystem found (nearly) full is reported as full.
    """
    reason = None
    seen = [error]
    for e in seen:  # the exception, its causes, and the per-rank failures DCP collects
        if isinstance(e, OSError) and e.errno:
            reason = os.strerror(e.errno).lower()  # "no space left on device"
            break
        seen += [c for c in (e.__cause__, e.__context__) if c is not None and c not in seen]
        seen += [f[0] for f in getattr(e, "failures", {}).values() if f[0] not in seen]
    if reason is None and _free_bytes(path) < 1 << 20:
        reason = os.strerror(errno.ENOSPC).lower()
    fix = "choose a writable hydra.run.dir"
    if reason == os.strerror(errno.ENOSPC).lower():
        fix = "free some space there or choose another hydra.run.dir"
    return UserError(f"cannot write {path}: {reason or describe_error(error)}; {fix}")


def describe_error(error: BaseException) -> str:
    """An exception in one line, without its traceback; DCP's per-rank failures unwrapped."""
    failures = getattr(error, "failures", None)  # torch's CheckpointException
    if failures:
        error = next(iter(failures.values()))[0]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _free_bytes(path: Path) -> float:
    for parent in (path, *path.parents):  # the nearest one that exists
        try:
            return shutil.disk_usage(parent).free
        except OSError:
            continue
    return math.inf


# --- naming and logging ----------------------------------------------------------------------


@dataclass(kw_only=True)
class RunIdentity:
    experiment: str
    cluster: str
    provider: str
    gpu_type: str
    job_id: str

    @property
    def wandb_name(self) -> str:
        return f"{self.experiment}_{self.cluster}_{self.job_id}"

    @property
    def wandb_group(self) -> str:
        return f"{self.experiment}/{self.cluster}"

    @property
    def wandb_tags(self) -> list[str]:
        return [self.provider, self.cluster, self.gpu_type, self.experiment, f"job_{self.job_id}"]


class ConsoleReport:
    """What a person watching the run sees (console and train.log, through logging): the run
    dir and key settings, one line per `logging.freq` steps with an ETA, val losses, a summary.
    Quiet when logging is not configured (e.g. `hydra/job_logging=disabled`)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, identity: RunIdentity):
        self.total = cfg.steps
        self.start_time: float | None = None
        self.start_step = 0
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.last_step = 0
        m, d, o = cfg.model, cfg.data, cfg.optim
        log.info("run dir: %s", run_dir.resolve())
        log.info(
            "%s on %s (%s): %d steps; model dim %d x %d layers x %d heads; batch %d x seq %d; "
            "%s lr %.3g (%s, warmup %d); %s",
            cfg.name, identity.cluster, identity.gpu_type, cfg.steps, m.dim, m.n_layers,
            m.n_heads, d.batch_size, d.seq_len, o.optimizer, o.lr, o.scheduler, o.warmup,
            d.tokenizer.name,
        )  # fmt: skip

    def report(self, step: int, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if self.start_time is None:
            self.start_time, self.start_step = now, step
        self.last_step = step
        if "loss/init" in metrics:
            log.info("step %d/%d | loss/init %.4f", step, self.total, metrics["loss/init"])
        if "loss/out" in metrics:
            done = step - self.start_step
            eta = (now - self.start_time) / done * (self.total - step) if done > 0 else None
            tok = metrics.get("tokens_per_s")
            log.info(
                "step %d/%d | loss %.4f | lr %.3g | %s tok/s | ETA %s", step, self.total,
                metrics["loss/out"], metrics.get("lr", float("nan")),
                f"{tok:,.0f}" if tok is not None else "-", _clock(eta),
            )  # fmt: skip
        if "loss/val" in metrics:
            self.last_val = metrics["loss/val"]
            if self.best_val is None or self.last_val < self.best_val:
                self.best_val = self.last_val
            log.info("step %d/%d | val loss %.4f", step, self.total, self.last_val)

    def summary(self, ok: bool) -> None:
        if not ok:
            return
        took = time.monotonic() - self.start_time if self.start_time is not None else 0.0
        val = "-" if self.last_val is None else f"{self.last_val:.4f} (best {self.best_val:.4f})"
        log.info("done: step %d/%d in %s; final val loss %s", self.last_step, self.total,
                 _clock(took), val)  # fmt: skip


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricLogger:
    """Writes one JSON object per line to `metrics.jsonl`; mirrors to WandB and the console on
    rank 0."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, identity: RunIdentity, *, rank: int):
        self.enabled = rank == 0
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.console = None
        if not self.enabled:
            return
        self.console = ConsoleReport(cfg, run_dir, identity)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")  # append: a resumed run continues
        except OSError as e:
            raise output_error(self.path, e) from e
        if cfg.logging.wandb is not None and cfg.logging.wandb.mode != "disabled":
            self.wandb_run = _init_wandb(cfg, run_dir, identity)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if v is not None}
        record = {"step": step, "time": time.time(), **clean}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise output_error(self.path, e) from e
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=step)
        self.console.report(step, clean)

    def close(self, *, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        self.console.summary(ok=exit_code == 0)
        with contextlib.suppress(OSError):  # a failed write was reported when it happened
            self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def _init_wandb(cfg: TrainConfig, run_dir: Path, identity: RunIdentity):
    import wandb
    from omegaconf import OmegaConf

    wb = cfg.logging.wandb
    mode = wb.mode
    if mode in (None, "online") and not wandb_key_configured():
        # Never kill training over logging: without a key, keep the run offline (syncable later).
        log.warning(
            "WandB has no API key (run `wandb login` or set WANDB_API_KEY); logging offline "
            "instead (set logging.wandb.mode=offline to say so, or logging.wandb=null)"
        )
        mode = "offline"
    # A stable id from the run directory: a resumed or requeued run continues the same run.
    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(
        project=wb.project,
        entity=wb.entity,
        mode=mode,
        dir=wb.dir or str(run_dir),
        id=run_id,
        resume="allow",
        name=identity.wandb_name,
        group=identity.wandb_group,
        tags=identity.wandb_tags,
        config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
    )


def wandb_key_configured(environ=os.environ) -> bool:
    """Whether WandB will find a key (environment or ~/.netrc): never reads or prints it."""
    import netrc

    if environ.get("WANDB_API_KEY") or environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    path = environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        hosts = netrc.netrc(path).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


class Throughput:
    """tokens/s and MFU over the interval since the last call (one host sync per interval)."""

    def __init__(self, *, flops_per_token: float, peak_flops_per_s: float | None, world_size: int):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_per_s
        self.world_size = world_size
        self.last_time = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def reset(self) -> None:
        """Start a new interval, e.g. after an evaluation that should not count as training."""
        self.last_time, self.tokens = time.perf_counter(), 0

    def measure(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.last_time, 1e-9)
        tokens_per_s = self.tokens / elapsed  # this rank's tokens
        self.reset()
        out = {
            "tokens_per_s": tokens_per_s * self.world_size,
            "tokens_per_s_per_gpu": tokens_per_s,
        }
        if self.peak:
            out["mfu"] = tokens_per_s * self.flops_per_token / self.peak
        return out


def finite(value: float) -> bool:
    return math.isfinite(value)
