"""What runs where a cluster's Slurm is: on this machine, or on a login node over ssh.

submitit needs its job folder on the cluster's filesystem and the cluster's own `squeue` and
`sacct`, so for a remote cluster this module runs ON the login node (`python -m
lingua_sweep.sweep.agent CMD` in the sweep's code snapshot), and for a local one the backend
calls the same functions in-process. Requests and replies are small JSON, except jobs and
return values, which travel cloudpickled and base64-encoded.

    submit  --folder F --params JSON --batch N --fence D  < tasks
                                          -> {"ids"} or {"refused", "kind"} or {"fenced"}
    resolve --batch N --fence D [--since T] [--cancel]         -> {"ids"} or {"in_flight": true}
    poll                                       < JSON    -> states, finished outcomes, file tails
    cancel  --jobs ID,...
    check   --paths P,...                                -> JSON list of the paths that are missing
    limits  --prefix P [--qos Q] [--account A]    -> the user's limits, usage by jobs not ours
    estimate --params JSON                       -> {"start"}: sbatch --test-only's answer
    reserved --params JSON                       -> {"reserved"}: nodes reservations keep
    time-used [--partition P]                    -> {"time_used"}: others' share of their limits
"""

import argparse
import base64
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import cloudpickle

from lingua_sweep.sweep import slurm_queries
from lingua_sweep.sweep.job import JobTask, last_line
from lingua_sweep.sweep.layout import STATUS_FILE
from lingua_sweep.sweep.limits import classify_refusal
from lingua_sweep.sweep.slurm_queries import find_batch
from lingua_sweep.sweep.states import RESUBMIT_ENDS, SLURM_ENDED, WHY_FAILED
from lingua_sweep.sweep.tails import read_piece

# --- submitting -----------------------------------------------------------------------------


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


def submit(tasks: list[JobTask], *, folder: str, params: dict[str, Any], slurm: bool) -> list[str]:
    """Submits the tasks as one array (one sbatch call, named params["job_name"]); their ids."""
    executor = make_executor(folder=folder, params=params, slurm=slurm)
    if not slurm:
        jobs = [executor.submit(task) for task in tasks]
        for job in jobs:
            job._cancel_at_deletion = False  # the journal owns its lifetime, not this object
        return [str(job.job_id) for job in jobs]
    with executor.batch():
        jobs = [executor.submit(task) for task in tasks]
    return [str(job.job_id) for job in jobs]


def submit_fenced(
    tasks: list[JobTask], *, folder: str, params: dict[str, Any], batch: str, fence: str
) -> dict[str, Any]:
    """sbatch behind a fence, so that a submission is never declared lost while it may land.

    The fence is `<fence>/<batch>.lock`, flocked for the whole sbatch: `resolve` cannot take it
    while this runs, however slow slurmctld is, and once `resolve` has taken it and written
    `<batch>.fenced`, a late call of this function (its ssh delayed) submits nothing. The ids are
    written next to the lock before anything is printed, so a launcher that never heard the
    answer (timeout, Ctrl-C, kill -9) learns them from `resolve`.
    """
    with _fence(fence, batch, wait=True) as paths:
        if paths["ids"].exists():  # the same call, retried
            return {"ids": json.loads(paths["ids"].read_text())}
        if paths["fenced"].exists():
            return {"fenced": True}
        try:
            ids = submit(tasks, folder=folder, params=params, slurm=True)
        except Exception as e:  # noqa: BLE001 - submitit raises several kinds for a refusal
            # sbatch can fail after slurmctld took the job (a timed-out reply): look by name.
            ids = find_batch(batch)
            if not ids:
                _write_atomic(paths["fenced"], "refused\n")
                kind, why = classify_refusal(str(e) or type(e).__name__)
                return {"refused": why, "kind": kind}
        _write_atomic(paths["ids"], json.dumps(ids))
        if paths["cancel"].exists():  # the launcher gave up on this batch while sbatch ran
            cancel(ids, slurm=True)
        return {"ids": ids}


def resolve(batch: str, fence: str, *, since: float | None = None, cancel: bool = False):
    """What became of a submission whose answer never arrived: {"ids": [...]} (empty: it never
    reached Slurm and never will), or {"in_flight": True} while its sbatch still runs (then,
    with `cancel`, its jobs are cancelled as soon as it returns)."""
    with _fence(fence, batch, wait=False) as paths:
        if paths is None:
            if cancel:
                _write_atomic(Path(fence) / f"{batch}.cancel", "cancel\n")
            return {"in_flight": True}
        if paths["ids"].exists():
            return {"ids": json.loads(paths["ids"].read_text())}
        if not paths["fenced"].exists():
            _write_atomic(paths["fenced"], "fenced\n")
        return {"ids": find_batch(batch, since=since)}


@contextlib.contextmanager
def _fence(fence: str, batch: str, *, wait: bool):
    import fcntl

    root = Path(fence)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f"{batch}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield {k: root / f"{batch}.{k}" for k in ("ids", "fenced", "cancel")}
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# --- watching -------------------------------------------------------------------------------


def local_state(folder: str, job_id: str, tasks: int) -> dict[str, str]:
    """A `local` cluster job is a process tree on this machine: done when its results exist."""
    from submitit.core.utils import JobPaths

    if all(JobPaths(folder, job_id, t).result_pickle.exists() for t in range(tasks)):
        return {"state": "COMPLETED"}
    return {"state": "RUNNING"} if _alive(int(job_id)) else {"state": "FAILED", "exit": "died"}


def _alive(pid: int) -> bool:
    # Reap it if it is our exited child; not our child (a resumed launcher): /proc tells.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and b"submitit" in cmdline


def outcome(folder: str, job_id: str, tasks: int, state: dict[str, str]) -> dict[str, Any]:
    """A final job's result: rank 0's return value, or the first failing rank's error."""
    from submitit.core.utils import JobPaths

    slurm_state = state["state"]
    if slurm_state == "CANCELLED":
        return {"status": "CANCELLED", "error": "cancelled (scancel)"}
    if slurm_state in RESUBMIT_ENDS:  # whatever its ranks said as they were stopped
        return {"status": "RESUBMIT", "error": WHY_FAILED[slurm_state]}
    results: dict[int, tuple] = {}
    for task in range(tasks):
        path = JobPaths(folder, job_id, task).result_pickle
        if path.exists():
            try:
                with path.open("rb") as f:
                    results[task] = cloudpickle.load(f)
            except Exception as e:  # noqa: BLE001 - any unreadable result is that rank's failure
                results[task] = ("error", f"unreadable result {path}: {e}")
    for task, (kind, value) in sorted(results.items()):
        if kind == "error":
            where = f"rank {task}: " if tasks > 1 else ""
            return {"status": "FAILED", "error": where + last_line(str(value)), "rank": task}
    missing = [t for t in range(tasks) if t not in results]
    if not missing and slurm_state in ("COMPLETED", "FINISHED"):
        ret = results[0][1]  # rank 0's JobReturn
        value = getattr(ret, "_return_value", ret)
        return {"status": "COMPLETED", "value": value, "job_return": ret}
    why = WHY_FAILED.get(slurm_state, f"{slurm_state} (exit {state.get('exit', '?')})")
    log = JobPaths(folder, job_id, missing[0] if missing else 0).stderr
    return {"status": "FAILED", "error": f"{why}; no result from rank(s) {missing}; see {log}",
            # COMPLETED without its results: maybe a network filesystem not showing them yet.
            "missing": slurm_state == "COMPLETED"}  # fmt: skip


def poll(request: dict[str, Any], *, slurm: bool) -> dict[str, Any]:
    """One poll of a cluster: every job's state, the outcomes of final ones, and file tails.

    request: {"jobs": [{"id", "folder", "tasks", "dir"}], "files": {path: offset}, "prefix": str}
    Each job's state says `ran` once its dir holds a status.json written by that very job (it
    started, even if the launcher never saw it RUNNING); `named` lists the active jobs whose
    name starts with `prefix` (so the launcher can tell its own from strays).
    """
    jobs = request.get("jobs", [])
    named: dict[str, str] = {}
    usage: dict[str, int] = {}
    if slurm:
        states, named, usage = slurm_queries.slurm_states(
            [j["id"] for j in jobs], request.get("prefix")
        )
    else:
        states = {j["id"]: local_state(j["folder"], j["id"], j["tasks"]) for j in jobs}
    outcomes = {}
    for j in jobs:
        state = states[j["id"]]
        own = _own_status(j["dir"], j["id"]) if j.get("dir") else None
        whole_array = state.pop("whole_array", False)  # slurm_states' marker, not the launcher's
        if own is not None and whole_array:
            # It started, so its array's line is not its own: unknown until sacct has it (a
            # task that completed read CANCELLED, from the line of the pending rest).
            state = states[j["id"]] = {"state": "UNKNOWN"}
        if own is not None:
            state["ran"] = True
        if state["state"] in SLURM_ENDED:
            preempted = own is not None and own.get("status") == "PREEMPTED"
            if preempted and state["state"] in ("FAILED", "COMPLETED"):
                # Its trainer checkpointed on SIGTERM and exited within the grace time, so
                # Slurm calls it FAILED: the job's own word decides. (A scancel or a time limit
                # sends SIGTERM too; those end CANCELLED or TIMEOUT and stay so.)
                state = {**state, "state": "PREEMPTED"}
            outcomes[j["id"]] = outcome(j["folder"], j["id"], j["tasks"], state)
    files = {path: read_piece(path, offset) for path, offset in request.get("files", {}).items()}
    return {"states": states, "outcomes": outcomes, "files": files, "named": named, "usage": usage}


def _own_status(job_dir: str, job_id: str) -> dict[str, Any] | None:
    """The job dir's status.json if that very Slurm job wrote it (it started), else None."""
    try:
        status = json.loads((Path(job_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    ours = isinstance(status, dict) and str(status.get("job_id")) == job_id
    return status if ours else None


def cancel(job_ids: list[str], *, slurm: bool) -> None:
    import signal

    if not job_ids:
        return
    if slurm:
        slurm_queries.run(["scancel", *job_ids])
        return
    for pid in job_ids:
        if _alive(int(pid)):
            # submitit's local controller forwards SIGTERM to its tasks (SIGINT is ignored by
            # processes started in the background by a non-interactive shell).
            os.kill(int(pid), signal.SIGTERM)


def missing_paths(patterns: list[str]) -> list[str]:
    """The paths (or glob patterns) that match nothing on this machine."""
    import glob

    return [p for p in patterns if not glob.glob(os.path.expanduser(p))]


# --- CLI, run on a remote login node --------------------------------------------------------


# The agent's answer is the last line that starts with this: a login node's own chatter (a motd,
# a module system, a site wrapper around python) may come before or after it.
ANSWER = b"@lingua-sweep-agent "


def _b64(obj: Any) -> bytes:
    return ANSWER + base64.b64encode(cloudpickle.dumps(obj)) + b"\n"


def _json(obj: Any) -> bytes:
    return ANSWER + json.dumps(obj).encode() + b"\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingua_sweep.sweep.agent")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit")
    p.add_argument("--folder", required=True)
    p.add_argument("--params", required=True, help="JSON of sbatch parameters")
    p.add_argument("--batch", required=True)
    p.add_argument("--fence", required=True)
    p = sub.add_parser("resolve")
    p.add_argument("--batch", required=True)
    p.add_argument("--fence", required=True)
    p.add_argument("--since", type=float)
    p.add_argument("--cancel", action="store_true")
    sub.add_parser("poll")
    p = sub.add_parser("cancel")
    p.add_argument("--jobs", required=True)
    p = sub.add_parser("check")
    p.add_argument("--paths", required=True)
    p = sub.add_parser("limits")
    p.add_argument("--prefix", required=True)
    p.add_argument("--qos")
    p.add_argument("--account")
    p = sub.add_parser("estimate")
    p.add_argument("--params", required=True, help="JSON of sbatch parameters")
    p = sub.add_parser("reserved")
    p.add_argument("--params", required=True, help="JSON of sbatch parameters")
    p = sub.add_parser("time-used")
    p.add_argument("--partition")
    args = parser.parse_args(argv)

    out = sys.stdout.buffer
    if args.command == "submit":
        tasks = cloudpickle.loads(base64.b64decode(sys.stdin.buffer.read()))
        params = json.loads(args.params)
        reply = submit_fenced(tasks, folder=args.folder, params=params, batch=args.batch,
                              fence=args.fence)  # fmt: skip
        out.write(_json(reply))
    elif args.command == "resolve":
        reply = resolve(args.batch, args.fence, since=args.since, cancel=args.cancel)
        out.write(_json(reply))
    elif args.command == "poll":
        out.write(_b64(poll(json.loads(sys.stdin.read()), slurm=True)))
    elif args.command == "cancel":
        cancel(args.jobs.split(","), slurm=True)
    elif args.command == "check":
        out.write(_json(missing_paths(json.loads(args.paths))))
    elif args.command == "limits":
        limits = slurm_queries.read_limits(qos=args.qos, account=args.account)
        usage = slurm_queries.user_usage(args.prefix)
        out.write(_json({"limits": limits.to_json(), "usage": usage}))
    elif args.command == "estimate":
        out.write(_json({"start": slurm_queries.start_estimate(json.loads(args.params))}))
    elif args.command == "reserved":
        out.write(_json({"reserved": slurm_queries.reserved_nodes(json.loads(args.params))}))
    elif args.command == "time-used":
        out.write(_json({"time_used": slurm_queries.others_time_used(args.partition)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
