"""The sweep's durable state: an append-only JSONL file in the sweep dir, `journal.jsonl`.

Every fact the controller learns is appended before it acts on it (a job registered, a
submission about to happen, the ids Slurm gave, each state change, the result), so a launcher
killed at any moment leaves a journal from which a new one picks the sweep up. `status`,
`cancel`, `resume` and `results` read it; nothing else holds the truth.

Why JSONL and not SQLite: one `write()` of one line with O_APPEND is atomic on a local disk and
survives `kill -9`, a torn last line (power loss, full disk) is simply skipped on read, and the
file can be read with `cat`, `jq` or `tail -f` from any machine, also over NFS, where SQLite's
locking is unreliable. Replaying a few thousand lines takes milliseconds.
"""

import fcntl
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lingua_sweep.errors import UserError
from lingua_sweep.sweep import clock
from lingua_sweep.sweep.states import FINAL, QUEUED, SUBMITTING

JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = ".launcher.lock"
VERSION = 1

__all__ = ["FINAL", "QUEUED", "SUBMITTING", "Journal", "JobEntry", "SweepState", "replay"]


@dataclass
class JobEntry:
    index: int
    overrides: list[str]
    config_hash: str
    trial: int | None = None  # Optuna's trial number, for the async sweeper
    state: str = QUEUED
    cluster: str | None = None
    job_id: str | None = None
    folder: str | None = None  # submitit's folder on the cluster's filesystem (with %j)
    remote_dir: str | None = None  # the job's output dir on the cluster; None: on this machine
    tasks: int = 1
    batch: str | None = None  # the Slurm job name of the submission it went in
    submitted_at: float | None = None
    started_at: float | None = None  # first seen RUNNING
    ended_at: float | None = None
    moves: int = 0  # resubmissions elsewhere after pending too long
    resubmits: int = 0  # submitted again after a preemption or a node failure
    reason: str | None = None  # Slurm's reason it is pending (squeue's %r), while it is
    target: str | None = None  # the cluster a move sent it to: where it goes next, only there
    # A cancel asked of Slurm and not yet confirmed: {status, note, step, to}. The job is final
    # (or moved) only once Slurm says it ended.
    stopping: dict[str, Any] | None = None
    history: list[list] = field(default_factory=list)  # [time, state, note]
    # Time-to-result placement's latest prediction for it ({cluster, at, start, slurm_start,
    # run_s, alt}, epochs), and the one its placement was decided on (`planned`, with
    # `slurm_own`: Slurm's first `squeue --start` for it there, where that differed).
    forecast: dict[str, Any] | None = None
    planned: dict[str, Any] | None = None
    result: dict[str, Any] | None = None  # {status, value, error, step}

    @property
    def final(self) -> bool:
        return self.state in FINAL


@dataclass
class SweepState:
    header: dict[str, Any]
    jobs: dict[int, JobEntry]
    intents: dict[str, dict]  # batch name -> intent, until its `submitted` record arrives
    cancel_requested: bool = False
    cancel_reason: str = "cancelled"
    extra: list[dict] = field(default_factory=list)  # records of other kinds (study, notes)
    # Every Slurm job this sweep knows, (cluster, id) -> job index (None: a stray).
    known_ids: dict[tuple[str, str], int | None] = field(default_factory=dict)
    # Slurm jobs that landed for a job already final or placed elsewhere (a late sbatch): they
    # must be cancelled and recorded as `stray`. (cluster, id) -> batch.
    strays: dict[tuple[str, str], str] = field(default_factory=dict)
    # Jobs not final, and jobs by state, so that a cycle's work is O(active jobs), not O(sweep).
    active: set[int] = field(default_factory=set)
    by_state: dict[str, set[int]] = field(default_factory=dict)
    # Jobs a record changed since a reader (the live view) last took this set.
    touched: set[int] = field(default_factory=set)

    def take_touched(self) -> set[int]:
        touched, self.touched = self.touched, set()
        return touched


class Journal:
    def __init__(self, sweep_dir: str | Path):
        self.dir = Path(sweep_dir)
        self.path = self.dir / JOURNAL_FILE
        self._lock_fd: int | None = None
        self.size_known = 0  # bytes this process has read or written: more means another writer

    def exists(self) -> bool:
        return self.path.exists()

    # --- writing ------------------------------------------------------------------------------

    def append(self, kind: str, **fields: Any) -> dict:
        return self.append_many([(kind, fields)])[0]

    def append_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[dict]:
        """Several records in one write and one fsync (a sweep's jobs registered at once)."""
        now = round(clock.now(), 3)
        records = [{"kind": kind, "t": now, **fields} for kind, fields in items]
        line = b"".join(
            (json.dumps(r, default=str, separators=(",", ":")) + "\n").encode() for r in records
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if _ends_torn(fd):
                line = b"\n" + line  # a crash tore the last line: start ours on a fresh one
            before = os.fstat(fd).st_size
            view = memoryview(line)
            while view:  # a full disk can take part of a write: never a short record unseen
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            if before == self.size_known:
                self.size_known = before + len(line)
        except OSError as e:
            raise UserError(f"cannot write the sweep journal {self.path}: {_os_reason(e)}") from e
        finally:
            os.close(fd)
        return records

    def lock(self) -> None:
        """One controller per sweep: a second launcher or `resume` fails at once, naming the first.

        flock dies with its process, so a `kill -9`ed launcher never leaves a stale lock.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"sweep {self.dir} is already being run by {holder}; watch it with "
                f"`lingua-sweep status {self.dir}` or stop that process first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- reading ------------------------------------------------------------------------------

    def changed_by_others(self) -> bool:
        """Whether someone else (`lingua-sweep cancel`) appended since we last read or wrote."""
        try:
            return self.path.stat().st_size != self.size_known
        except FileNotFoundError:
            return False

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        self.size_known = len(data)
        out = []
        for line in data.splitlines():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a torn line from a crash mid-write: the record never happened
            if isinstance(record, dict) and "kind" in record:
                out.append(record)
        return out

    def replay(self) -> SweepState:
        return replay(self.records())


def replay(records: list[dict]) -> SweepState:
    state = SweepState(header={}, jobs={}, intents={})
    for r in records:
        apply(state, r)
    return state


def apply(state: SweepState, r: dict) -> None:
    """One record's effect on the state: the only place that interprets records."""
    if "index" in r:
        indices = [r["index"]]
    else:
        indices = r.get("indices") or [int(i) for i in r.get("job_ids") or ()]
    before = {i: job.state for i in indices if (job := state.jobs.get(i)) is not None}
    _apply(state, r)
    for index in indices:
        job = state.jobs.get(index)
        if job is None:
            continue
        state.touched.add(index)
        (state.active.discard if job.final else state.active.add)(index)
        old = before.get(index)
        if old != job.state:
            if old is not None:
                state.by_state[old].discard(index)
            state.by_state.setdefault(job.state, set()).add(index)


def _apply(state: SweepState, r: dict) -> None:
    kind, t = r["kind"], r["t"]
    job = state.jobs.get(r.get("index")) if "index" in r else None
    if kind == "sweep":
        state.header = r
    elif kind == "job":
        state.jobs[r["index"]] = JobEntry(
            index=r["index"],
            overrides=list(r["overrides"]),
            config_hash=r["config_hash"],
            trial=r.get("trial"),
            history=[[t, QUEUED, None]],
        )
    elif kind == "intent":
        state.intents[r["batch"]] = r
        for i in r["indices"]:
            _set_state(state.jobs[i], t, SUBMITTING, r["cluster"])
            state.jobs[i].cluster = r["cluster"]
            state.jobs[i].batch = r["batch"]
    elif kind == "submitted":
        state.intents.pop(r["batch"], None)
        for index, job_id in r["job_ids"].items():
            entry = state.jobs[int(index)]
            key = (r["cluster"], job_id)
            if entry.state != SUBMITTING or entry.batch != r["batch"]:
                # Landed for a job that has moved on (final, requeued, elsewhere): a stray.
                state.known_ids.setdefault(key, None)
                state.strays[key] = r["batch"]
                continue
            state.known_ids[key] = entry.index
            entry.cluster, entry.job_id, entry.batch = r["cluster"], job_id, r["batch"]
            entry.folder, entry.tasks = r["folder"], r["tasks"]
            entry.remote_dir = (r.get("remote_dirs") or {}).get(str(index))
            entry.submitted_at = t
            _set_state(entry, t, "PENDING", f"{r['cluster']} job {job_id}")
    elif kind == "unsubmitted":  # an intent that provably never reached Slurm
        state.intents.pop(r["batch"], None)
        for i in r["indices"]:
            entry = state.jobs[i]
            if entry.state == SUBMITTING:
                entry.cluster = entry.batch = None
                _set_state(entry, t, QUEUED, r.get("reason"))
    elif kind == "state" and job is not None:
        if job.final:
            return
        _set_state(job, t, r["state"], r.get("reason"))
        job.reason = r.get("reason") if r["state"] == "PENDING" else None
        # `ran`: the job's own status.json says it started, though it was never seen RUNNING.
        if (r["state"] == "RUNNING" or r.get("ran")) and job.started_at is None:
            job.started_at = t
    elif kind == "stop" and job is not None:
        if not job.final:
            job.stopping = {k: r.get(k) for k in ("status", "note", "step", "to")}
    elif kind in ("moved", "resubmit") and job is not None:
        # Back to the queue, bound for `to`: elsewhere after a long wait, or again where its
        # checkpoint is after a preemption.
        if kind == "moved":
            job.moves += 1
        else:
            job.resubmits += 1
        # The move's own prediction (made when it was decided) stays; an older one is void.
        if kind == "resubmit" or (job.planned or {}).get("cluster") != r.get("to"):
            job.planned = None
        job.forecast = job.planned
        job.target, job.stopping, job.reason = r.get("to"), None, None
        job.cluster = job.job_id = job.folder = job.remote_dir = job.batch = None
        job.started_at = job.submitted_at = None
        _set_state(job, t, QUEUED, r.get("reason"))
    elif kind == "result" and job is not None:
        if job.final:
            return  # the first final word stands (a late poll after a cancel, say)
        job.result = {k: r.get(k) for k in ("status", "value", "value_pickle", "error", "step")}
        job.ended_at, job.stopping = t, None
        _set_state(job, t, r["status"], r.get("error"))
    elif kind == "forecast":
        for index, forecast in r["jobs"].items():
            entry = state.jobs.get(int(index))
            if entry is not None and not entry.final:
                plan = entry.planned
                if forecast.get("planned"):
                    entry.planned = forecast
                elif (plan and forecast.get("slurm_start") and "slurm_own" not in plan
                      and forecast.get("cluster") == plan.get("cluster")):  # fmt: skip
                    # Slurm's first estimate for this very job once queued (the plan's was
                    # for one more job; the tenth of a batch waits behind the nine).
                    entry.planned = {**plan, "slurm_own": forecast["slurm_start"]}
                entry.forecast = forecast
    elif kind == "stray":
        key = (r["cluster"], r["job_id"])
        state.known_ids.setdefault(key, None)
        state.strays.pop(key, None)
    elif kind == "cancel":
        state.cancel_requested = True
        state.cancel_reason = r.get("reason") or state.cancel_reason
    elif kind == "resumed":
        # A launcher picked the sweep up again: an earlier cancel (Ctrl-C) stopped that
        # launcher's jobs, which stay cancelled; the resumed one goes on with the rest.
        state.cancel_requested = False
        state.extra.append(r)
    else:
        state.extra.append(r)


def _set_state(job: JobEntry, t: float, new: str, note: str | None) -> None:
    if job.state != new or note:
        job.history.append([t, new, note])
    job.state = new


def _ends_torn(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def _os_reason(e: OSError) -> str:
    import errno

    if e.errno == errno.ENOSPC:
        return "no space left on device"
    return e.strerror or str(e)


def encode_value(value: Any) -> tuple[Any, str | None]:
    """A JSON value for the journal, or (None, base64 pickle) for anything else."""
    import base64

    import cloudpickle

    if value is None:
        return None, None
    try:
        json.dumps(value, allow_nan=True)
        return value, None
    except (TypeError, ValueError):
        return None, base64.b64encode(cloudpickle.dumps(value)).decode()


def decode_value(result: dict[str, Any]) -> Any:
    import base64

    import cloudpickle

    if result.get("value_pickle"):
        return cloudpickle.loads(base64.b64decode(result["value_pickle"]))
    return result.get("value")
