"""The submit/watch side of a sweep, run where the cluster's Slurm is: here or on a login node.

submitit needs its job folder on the cluster's filesystem and calls `sacct` without `-M`, so
for a remote cluster this module runs ON the login node (`python -m lingua_sweep.agent ...`
over ssh, the code rsynced there first); for a local one the launcher calls the same functions
in-process. Jobs travel as cloudpickled `JobTask`s; results come back the same way.

    submit  --folder F --params JSON   < tasks.pkl   -> JSON list of job ids
    states  --folder F --jobs ID,...                 -> JSON {id: slurm state}
    results --folder F --jobs ID,...                 -> pickle of {id: ("ok"|"error", value)}
    cancel  --jobs ID,...
"""

import argparse
import base64
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import cloudpickle
from omegaconf import DictConfig, open_dict

STATUS_FILE = "status.json"
# Slurm states after which a job will not run again (sacct's names; submitit's watcher too).
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "FINISHED",
    "INTERRUPTED",
    "UNKNOWN",
}


def job_output_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)


def write_status(job_dir: Path, **fields: Any) -> None:
    """status.json beside metrics.jsonl: what `lingua-sweep results` reads, also mid-sweep."""
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / STATUS_FILE
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(fields, updated=time.time())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current, indent=1, default=str))
    tmp.replace(path)


class JobTask:
    """One fully composed Hydra job, runnable on a compute node without Hydra's config loader.

    The launcher composes and validates every job locally; shipping the composed config (not
    the overrides) keeps the node from needing the submitting machine's config search path.
    """

    def __init__(self, *, task_function, config: DictConfig, job_num: int):
        self.task_function = task_function
        self.config = config
        self.job_num = job_num

    def __call__(self):
        import submitit
        from hydra.core.utils import JobStatus, run_job, setup_globals
        from hydra.types import HydraContext

        from lingua_sweep.train import Preempted

        setup_globals()
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # One process per GPU: expose torchrun's variables for torch.distributed.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        config = self.config.copy()
        with open_dict(config.hydra.job):
            config.hydra.job.id = str(env.job_id)
            config.hydra.job.num = self.job_num
        job_dir = job_output_dir(config)
        main = env.global_rank == 0
        if main:
            write_status(
                job_dir,
                status="RUNNING",
                job_id=str(env.job_id),
                cluster=config.cluster.name,
                host=socket.gethostname(),
                started=time.time(),
            )
        context = HydraContext(config_loader=None, callbacks=_no_callbacks())
        ret = run_job(
            hydra_context=context,
            task_function=self.task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        error = ret._return_value if ret.status == JobStatus.FAILED else None
        if isinstance(error, Preempted):
            if main:
                write_status(job_dir, status="PREEMPTED", error=str(error))
            if callable(error.previous_handler):
                error.previous_handler(error.signum, None)  # submitit: requeue, then exit
        if main:
            write_status(
                job_dir,
                status="COMPLETED" if error is None else "FAILED",
                error=None if error is None else _first_line(error),
                traceback=None if error is None else "".join(traceback.format_exception(error)),
                return_value=None if error is not None else ret._return_value,
                finished=time.time(),
            )
        return ret

    def checkpoint(self, *args, **kwargs):
        import submitit

        # Requeue the same job: the trainer resumes from its own latest checkpoint.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _no_callbacks():
    from hydra._internal.callbacks import Callbacks

    return Callbacks(config=None)


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


# --- submission, shared by the in-process and the over-ssh paths ----------------------------


def make_executor(*, folder: str, params: dict[str, Any], slurm: bool):
    import submitit

    params = dict(params)
    max_num_timeout = params.pop("max_num_timeout", 3)
    if not slurm:
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=max_num_timeout)
        executor.update_parameters(timeout_min=params.get("time", 60), tasks_per_node=1, nodes=1)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_num_timeout)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def submit(tasks: list[JobTask], *, folder: str, params: dict[str, Any], slurm: bool) -> list:
    """Submits the tasks as one array (one sbatch call); returns submitit Job objects."""
    executor = make_executor(folder=folder, params=params, slurm=slurm)
    if not slurm:
        return [executor.submit(task) for task in tasks]
    with executor.batch():
        jobs = [executor.submit(task) for task in tasks]
    return jobs


def slurm_job(folder: str, job_id: str):
    import submitit

    return submitit.SlurmJob(folder=folder, job_id=job_id)


def job_state(job) -> str:
    """Slurm state of a submitit job; a written result file is final whatever sacct says."""
    if job.paths.result_pickle.exists():
        return "FINISHED"
    state = job.state
    return state.split()[0].upper() if state else "UNKNOWN"


def job_outcome(job) -> tuple[str, Any]:
    """("ok", JobReturn) or ("error", text) for a finished job."""
    try:
        return "ok", job.result()
    except Exception as e:  # noqa: BLE001 - submitit raises several kinds; all mean "failed"
        return "error", f"{type(e).__name__}: {e}"


def cancel(job_ids: list[str]) -> None:
    import subprocess

    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False, timeout=60, capture_output=True)


# --- CLI, run on a remote login node --------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingua_sweep.agent")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit")
    p.add_argument("--folder", required=True)
    p.add_argument("--params", required=True, help="JSON of sbatch parameters")
    for name in ("states", "results"):
        p = sub.add_parser(name)
        p.add_argument("--folder", required=True)
        p.add_argument("--jobs", required=True)
    p = sub.add_parser("cancel")
    p.add_argument("--jobs", required=True)
    args = parser.parse_args(argv)

    if args.command == "submit":
        tasks = cloudpickle.loads(base64.b64decode(sys.stdin.buffer.read()))
        jobs = submit(tasks, folder=args.folder, params=json.loads(args.params), slurm=True)
        print(json.dumps([job.job_id for job in jobs]))
    elif args.command == "states":
        ids = args.jobs.split(",")
        print(json.dumps({i: job_state(slurm_job(args.folder, i)) for i in ids}))
    elif args.command == "results":
        outcomes = {i: job_outcome(slurm_job(args.folder, i)) for i in args.jobs.split(",")}
        sys.stdout.buffer.write(base64.b64encode(cloudpickle.dumps(outcomes)) + b"\n")
    elif args.command == "cancel":
        cancel(args.jobs.split(","))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
