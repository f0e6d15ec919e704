"""What runs on a compute node: one composed Hydra job, and the status.json it keeps.

A `JobTask` is pickled by the launcher and unpickled by submitit on the node; it needs neither
Hydra's config loader nor the launcher. Every task of a job (one per GPU) runs it; rank 0 writes
status.json (with the job's own Slurm id: what `lingua-sweep check` holds the journal to).
"""

import json
import os
import re
import socket
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

from lingua_sweep.sweep.layout import STATUS_FILE


def write_status(job_dir: Path, **fields: Any) -> None:
    """status.json beside metrics.jsonl: what `lingua-sweep results` reads, also mid-sweep."""
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / STATUS_FILE
    try:
        current = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        current = {}
    current.update(fields, updated=time.time())
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(current, indent=1, default=str))
    tmp.replace(path)


# Below Linux's ephemeral range (32768-60999), where every outgoing connection on the node takes
# its local port: submitit's default (20000-60000) collided with one on a busy node (EADDRINUSE).
MASTER_PORTS = range(20000, 32768)


def master_port(job_id: str, environ=os.environ) -> int:
    """The torch master's port, the same in every task of a job and different across jobs.

    A port Slurm reserved for the step (`MpiParams=ports=...`, SLURM_STEP_RESV_PORTS) is taken
    first: no other step on the node holds it. Otherwise one derived from the job id.
    """
    reserved = environ.get("SLURM_STEP_RESV_PORTS", "")
    if match := re.match(r"\d+", reserved):
        return int(match.group())
    return MASTER_PORTS[zlib.crc32(job_id.encode()) % len(MASTER_PORTS)]


class JobTask:
    """One Hydra job (`compose.JobConfig`), runnable on a compute node without Hydra's config
    loader.

    Every task of a job (one per GPU) runs it; rank 0 writes status.json. A raised error is
    raised again after it is recorded, so submitit stores it and Slurm says FAILED.
    """

    def __init__(self, *, task_function, config, job_num: int, cluster: str, singletons=None):
        self.task_function = task_function
        self.config = config
        self.job_num = job_num
        self.cluster = cluster
        # Hydra's global state as the launcher had it (job name, config store), as Hydra's own
        # launchers hand it to their jobs.
        self.singletons = singletons

    def __call__(self):
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import JobStatus, run_job, setup_globals
        from hydra.types import HydraContext
        from omegaconf import open_dict

        if self.singletons is not None:
            Singleton.set_state(self.singletons)
        setup_globals()
        os.environ["LINGUA_CLUSTER"] = self.cluster  # any app can tell where it runs
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # One process per GPU: expose torchrun's variables for torch.distributed.
            os.environ.setdefault("MASTER_PORT", str(master_port(str(env.job_id))))
            submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False, overwrite=True
            )
        # A JobConfig (its shape's template and its values, made whole here), or a composed
        # config (a job pickled by an earlier version).
        whole = getattr(self.config, "materialize", None)
        config = whole() if whole else self.config.copy()
        with open_dict(config.hydra.job):
            config.hydra.job.id = str(env.job_id)
            config.hydra.job.num = self.job_num
        job_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        main = env.global_rank == 0
        if main:
            write_status(
                job_dir, status="RUNNING", job_id=str(env.job_id), cluster=self.cluster,
                host=socket.gethostname(), started=time.time(), tasks=env.num_tasks,
            )  # fmt: skip
        context = HydraContext(config_loader=None, callbacks=_no_callbacks())
        ret = run_job(
            hydra_context=context,
            task_function=self.task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        if ret.status != JobStatus.FAILED:
            if main:
                write_status(job_dir, status="COMPLETED", error=None, finished=time.time())
            return ret  # the whole JobReturn (configs, working dir) for Hydra's sweepers
        error = ret._return_value
        previous_handler = getattr(error, "previous_handler", None)  # trainer's Preempted
        if callable(previous_handler):
            if main:
                write_status(job_dir, status="PREEMPTED", error=str(error))
            # SIGUSR2: submitit requeues the job and exits. SIGTERM (a preemption, a node being
            # taken): it returns, and the launcher, reading PREEMPTED, submits the job again.
            previous_handler(error.signum, None)
            raise error
        if main:
            write_status(
                job_dir, status="FAILED", error=error_line(error), finished=time.time(),
                traceback="".join(traceback.format_exception(error)),
            )  # fmt: skip
        raise error

    def checkpoint(self, *args, **kwargs):
        import submitit

        # Requeue the same job: the trainer resumes from its own latest checkpoint.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _no_callbacks():
    from hydra._internal.callbacks import Callbacks

    return Callbacks(config=None)


def error_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0] if text else type(error).__name__


def last_line(traceback_text: str) -> str:
    """The exception line of a formatted traceback: what went wrong, without the frames."""
    lines = [line for line in traceback_text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith((" ", "\t")) and ":" in line:
            # `pkg.module.SomeError: message` -> `SomeError: message`
            return re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=\w+(?:Error|Exception)?:)", "", line.strip())
    return lines[-1].strip() if lines else "unknown error"
