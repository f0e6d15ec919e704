"""`lingua-sweep check SWEEP_DIR`: a sweep's invariants, its journal against Slurm's own records.

I1  every Slurm job named like the sweep's batches is in the journal (`submitted` or `stray`)
I2  once the launcher exited and the sweep is done or cancelled, none of its jobs is in squeue
I3  each job ran to its end once: its earlier Slurm jobs were all `moved` or `resubmit`ted
    (preempted, lost with a node), at most one of the others reached a run-end state, and no
    stray COMPLETED
I4  the journal's final states are sacct's
I5  each job's outputs are its own: status.json names its last Slurm job, overrides.yaml holds
    its overrides
I6  an Optuna sweep's study: no trial RUNNING after the launcher exited, and n_trials finished

Each Slurm the sweep used is asked once with sacct and once with squeue, and again (every
second, up to `settle_s`) while sacct lags behind the journal: slurmdbd learns of a job a second
or two after slurmctld.
"""

import fcntl
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lingua_sweep.sweep import layout, remote
from lingua_sweep.sweep.journal import LOCK_FILE, JobEntry, apply, replay
from lingua_sweep.sweep.slurm_queries import by_id, per_task
from lingua_sweep.sweep.states import SLURM_ENDED, SLURM_RAN, agrees

SLURM_TIMEOUT_S = 60.0
# After these a job does not run again (as far as this check cares): Slurm's ends, and a
# preemption or revocation nobody requeued.
SLURM_DONE = {*SLURM_ENDED, "PREEMPTED", "REVOKED"}

SACCT = ["sacct", "-X", "-n", "-P", "-o", "JobID,JobName%200,State"]  # and -S <start>
SQUEUE = ["squeue", "-h", "-r", "-o", "%i|%j|%T"]

RunSlurm = Callable[[dict, list[str]], str]  # (a cluster config from the header, argv) -> stdout
Rows = dict[str, tuple[str, str]]  # Slurm job id -> (job name, state), the sweep's jobs only


@dataclass
class Violation:
    code: str  # "I1".."I6"; "UNREACHABLE": a cluster whose invariants went unchecked
    index: int | None
    cluster: str | None
    message: str
    job_id: str | None = None

    def __str__(self) -> str:
        where = [self.code, f"job #{self.index}" if self.index is not None else "",
                 f"on {self.cluster}" if self.cluster else "",
                 f"(job {self.job_id})" if self.job_id else ""]  # fmt: skip
        return f"{' '.join(w for w in where if w)}: {self.message}"


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    jobs: int = 0  # in the journal
    slurm_jobs: int = 0  # the sweep's, in sacct or squeue
    clusters: int = 0  # the sweep's Slurm clusters that answered

    def summary(self) -> str:
        return (f"ok: {self.jobs} jobs, {self.slurm_jobs} Slurm jobs on {self.clusters} "
                "clusters, no violation")  # fmt: skip


def check(
    sweep_dir: str | Path, *, settle_s: float = 10.0, run_slurm: RunSlurm | None = None
) -> list[Violation]:
    """The sweep's violations of I1..I6 (none: empty). `run_slurm` runs a Slurm command for a
    cluster (tests fake Slurm with it); by default here or on the cluster's login node."""
    return build_report(sweep_dir, settle_s=settle_s, run_slurm=run_slurm).violations


def build_report(
    sweep_dir: str | Path, *, settle_s: float = 10.0, run_slurm: RunSlurm | None = None
) -> Report:
    from lingua_sweep.sweep.verbs import open_journal

    journal = open_journal(sweep_dir)
    c = Facts(journal.records(), launcher_running(journal.dir))
    c.sacct, c.squeue, unreachable = ask_slurms(c, settle_s, run_slurm or default_run_slurm)
    out = [Violation("UNREACHABLE", None, slurm, f"{why}; I1-I4 not checked there")
           for slurm, why in unreachable.items()]  # fmt: skip
    out += orphans(c) + leftovers(c) + reruns(c) + final_states(c, settle_s)
    for index, job in sorted(c.state.jobs.items()):
        out += outputs(Path(layout.job_dir(journal.dir, index)), index, job, c)
    if (journal.dir / "optuna.db").exists() and c.state.header.get("study"):
        out += study(journal.dir, c)
    return Report(
        violations=out,
        jobs=len(c.state.jobs),
        slurm_jobs=sum(len(c.sacct[s].keys() | c.squeue[s].keys()) for s in c.sacct),
        clusters=sum(1 for s in c.slurm_of.values() if s in c.sacct),
    )


class Facts:
    """The journal as the checks need it, and (once asked) the answers of its Slurms.

    A Slurm job is (slurm, id), slurm being the first name of the clusters that share one Slurm
    (alpha and alpha-gpu: two partitions of one), so a job is found under either name."""

    def __init__(self, records: list[dict], running: bool):
        self.running = running
        header = records[0] if records and records[0]["kind"] == "sweep" else {}
        self.configs = header.get("cluster_configs", {})
        self.prefix = layout.batch_prefix(header.get("name") or "sweep", header.get("id", "sweep"))
        self.start = header.get("t", time.time())
        firsts: dict[str, str] = {}
        self.slurm_of: dict[str, str] = {}  # cluster name -> its Slurm; local clusters absent
        for name, cfg in self.configs.items():
            if cfg.get("slurm", True):
                key = json.dumps([cfg.get("login"), cfg.get("ssh_options"), cfg.get("env")])
                self.slurm_of[name] = firsts.setdefault(key, name)
        self.runs: dict[int, list[tuple[str, str]]] = {}  # index -> its (cluster, id)s, in order
        self.index_of: dict[tuple, int] = {}
        self.strays: dict[tuple, dict] = {}  # `stray` records, and ids that landed for no job
        self.moved: set[tuple] = set()  # replaced by a later Slurm job: moved or resubmitted
        self.resubmitted: set[tuple] = set()  # preempted or lost with its node, then resubmitted
        self.stops: dict[tuple, dict] = {}
        # Replayed record by record: a `submitted` id is a job's run only if the replay gives
        # it to the job (one that landed for a job already final or elsewhere is a stray).
        self.state = replay([])
        for r in records:
            apply(self.state, r)
            if r["kind"] == "submitted":
                for index, job_id in r["job_ids"].items():
                    key = self.key(r["cluster"], job_id)
                    self.index_of[key] = int(index)
                    job = self.state.jobs[int(index)]
                    if (job.cluster, job.job_id) == (r["cluster"], job_id):
                        self.runs.setdefault(int(index), []).append((r["cluster"], str(job_id)))
                    else:
                        self.strays.setdefault(key, {**r, "job_id": str(job_id)})
            elif r["kind"] in ("moved", "resubmit", "stray", "stop"):
                key = self.key(r["cluster"], r["job_id"])
                if r["kind"] in ("moved", "resubmit"):
                    self.moved.add(key)
                    if r["kind"] == "resubmit":
                        self.resubmitted.add(key)
                else:
                    (self.strays if r["kind"] == "stray" else self.stops)[key] = r
        self.known = self.index_of.keys() | self.strays.keys()
        self.done = all(job.final for job in self.state.jobs.values())
        # Each job's Slurm job now: its last, unless that one was moved away.
        self.last = {i: (job.cluster, str(job.job_id)) for i, job in self.state.jobs.items()
                     if job.job_id and job.cluster}  # fmt: skip
        # What sacct must know as ended before its answers are compared with the journal.
        self.ended = self.moved | {k for k, r in self.strays.items() if r["kind"] == "stray"}
        for i, run in self.last.items():
            if self.state.jobs[i].final:
                self.ended.add(self.key(*run))
        self.sacct: dict[str, Rows] = {}
        self.squeue: dict[str, Rows] = {}

    def key(self, cluster: str, job_id) -> tuple:
        return self.slurm_of.get(cluster, f"local:{cluster}"), str(job_id)

    def sacct_state(self, cluster: str, job_id: str) -> str | None:
        slurm, job_id = self.key(cluster, job_id)
        row = by_id(self.sacct.get(slurm, {}), job_id)
        return row[1].split()[0] if row else None  # "CANCELLED by 0" -> CANCELLED


# --- the invariants ---------------------------------------------------------------------------


def orphans(c: Facts) -> list[Violation]:
    """I1: every Slurm job with the sweep's name is in the journal."""
    out = []
    # An array cancelled before Slurm split it is one record under its base id.
    arrays = {(s, i.split("_")[0]) for s, i in c.known if "_" in i}
    for slurm in c.sacct:
        for job_id, (name, state) in sorted({**c.sacct[slurm], **c.squeue[slurm]}.items()):
            intent = c.state.intents.get(name)
            if (slurm, job_id) in c.known | arrays or (intent and c.running):
                continue  # known, or submitted a moment ago: the launcher is resolving it
            note = "; its intent is unresolved (a resume resolves it)" if intent else ""
            where = intent["cluster"] if intent else slurm
            message = f"Slurm job {name} ({state}) is in no `submitted` or `stray` record{note}"
            out.append(Violation("I1", None, where, message, job_id))
    return out


def leftovers(c: Facts) -> list[Violation]:
    """I2: once the launcher is gone and the sweep done or cancelled, nothing of it in squeue."""
    if c.running or not (c.done or c.state.cancel_requested):
        return []
    why = "cancelled" if c.state.cancel_requested else "done"
    out = []
    for slurm, rows in c.squeue.items():
        for job_id, (name, state) in sorted(rows.items()):
            if state.split()[0] not in SLURM_DONE:
                message = f"{name} is {state} in squeue; the launcher exited, the sweep is {why}"
                out.append(Violation("I2", c.index_of.get((slurm, job_id)), slurm, message, job_id))
    return out


def reruns(c: Facts) -> list[Violation]:
    """I3: a job's earlier Slurm jobs were moved; one of them at most ran to its end."""
    out = []
    for index, runs in sorted(c.runs.items()):
        for cluster, job_id in runs[:-1]:
            key = c.key(cluster, job_id)
            if key not in c.moved and key not in c.strays:
                stop = c.stops.get(key)
                note = f"; a stop ({stop.get('status')}) was asked, never confirmed" if stop else ""
                message = f"was submitted again, with no `moved` record for this one{note}"
                out.append(Violation("I3", index, cluster, message, job_id))
        # A run cut short by its node (NODE_FAIL) and resubmitted resumes; it is not a rerun.
        ends = [(cl, i, s) for cl, i in runs if (s := c.sacct_state(cl, i)) in SLURM_RAN
                and c.key(cl, i) not in c.resubmitted]  # fmt: skip
        if len(ends) > 1:
            listed = ", ".join(f"{cl} job {i} {s}" for cl, i, s in ends)
            out.append(Violation("I3", index, None, f"ran to its end {len(ends)} times: {listed}"))
    for (_, job_id), r in c.strays.items():
        if c.sacct_state(r["cluster"], job_id) == "COMPLETED":
            message = f"stray {r.get('batch')} COMPLETED: it ran before it was cancelled"
            out.append(Violation("I3", None, r["cluster"], message, job_id))
    return out


def final_states(c: Facts, settle_s: float) -> list[Violation]:
    """I4: the journal's final states are sacct's (local jobs and unreachable Slurms aside)."""
    out = []
    for index, job in sorted(c.state.jobs.items()):
        if not job.final or index not in c.last:
            continue  # not final; or never in Slurm, or moved away before it ran
        cluster, job_id = c.last[index]
        if c.key(cluster, job_id)[0] not in c.sacct:
            continue
        state = c.sacct_state(cluster, job_id)
        if state is None:
            message = f"journal {job.state}, sacct has no record after {settle_s:g}s"
        elif not agrees(job.state, state):
            message = f"journal {job.state}, sacct {state}"
        else:
            continue
        out.append(Violation("I4", index, cluster, message, job_id))
    return out


def outputs(job_dir: Path, index: int, job: JobEntry, c: Facts) -> list[Violation]:
    """I5: status.json was written by the job's last Slurm job; its overrides are its own."""
    out = []
    last = c.last.get(index)
    if job.final and last and last[0] in c.slurm_of:
        try:
            written = json.loads((job_dir / "status.json").read_text()).get("job_id")
        except (OSError, ValueError, AttributeError):
            written = None  # absent or torn: nothing to compare
        if written is not None and str(written) != last[1]:
            message = f"status.json was written by job {written}, not the journal's last job"
            out.append(Violation("I5", index, last[0], message, last[1]))
    path = job_dir / ".hydra" / "overrides.yaml"
    torn = path.exists() and path.stat().st_size == 0 and job.state != "COMPLETED"
    if path.exists() and not torn:  # torn: Hydra's write hit a full disk, and the job failed
        try:
            got = own_overrides(yaml.safe_load(path.read_text()) or [])
        except (OSError, yaml.YAMLError, TypeError) as e:
            return [*out, Violation("I5", index, None, f"cannot read {path}: {e}")]
        want = own_overrides(job.overrides)
        if got != want:
            message = f".hydra/overrides.yaml holds {got}, the journal {want}"
            out.append(Violation("I5", index, None, message))
    return out


def own_overrides(overrides: list) -> list[str]:
    """What makes the job what it is: its overrides, not Hydra's, nor where it ran."""
    out = []
    for o in map(str, overrides):
        key = o.split("=", 1)[0].lstrip("+~")
        if key not in ("cluster", "hydra") and not key.startswith(("hydra.", "hydra/")):
            out.append(o)
    return sorted(out)


def study(sweep_dir: Path, c: Facts) -> list[Violation]:
    """I6: once the launcher exited, no trial RUNNING; when done, n_trials trials finished."""
    if c.running:
        return []  # a live study: RUNNING trials are the ones in flight
    import optuna
    from omegaconf import OmegaConf

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = c.state.header["study"]["name"]
    try:
        trials = optuna.load_study(
            study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}"
        ).get_trials(deepcopy=False)
    except KeyError:
        return [Violation("I6", None, None, f"optuna.db has no study {name!r}")]
    index_of = {job.trial: i for i, job in c.state.jobs.items() if job.trial is not None}
    out = []
    for t in trials:
        if t.state.name == "RUNNING":
            message = f"trial {t.number} is RUNNING, but the launcher exited"
            out.append(Violation("I6", index_of.get(t.number), None, message))
    if not c.done or c.state.cancel_requested:
        return out
    try:
        config = OmegaConf.load(sweep_dir / "multirun.yaml")
        n_trials = int(OmegaConf.select(config, "hydra.sweeper.n_trials"))
    except (OSError, ValueError, TypeError) as e:
        return [*out, Violation("I6", None, None, f"no hydra.sweeper.n_trials: {e}")]
    grids = [t.system_attrs["search_space"] for t in trials if "search_space" in t.system_attrs]
    if grids:  # a GridSampler stops at the end of its grid
        n_trials = min(n_trials, math.prod(len(v) for v in grids[0].values()))
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")
                and t.user_attrs.get("stopped") is not True]  # fmt: skip
    if len(finished) != n_trials:
        message = f"{len(finished)} finished trials in study {name!r}, n_trials={n_trials}"
        out.append(Violation("I6", None, None, message))
    return out


# --- asking Slurm -----------------------------------------------------------------------------


def ask_slurms(c: Facts, settle_s: float, run_slurm: RunSlurm):
    """({slurm: sacct rows}, {slurm: squeue rows}) of the Slurms that answered, and {cluster:
    why} of those that did not; a Slurm whose sacct lags behind the journal is asked again."""
    since = f"now-{int(time.time() - c.start) + 60}seconds"  # the sweep's start, minus a minute
    sacct, squeue, unreachable = {}, {}, {}
    ask = sorted(set(c.slurm_of.values()))
    deadline = time.monotonic() + settle_s
    while True:
        for slurm in ask:
            cfg = c.configs[slurm]
            try:
                listed = run_slurm(cfg, [*SACCT, "-S", since])
                sacct[slurm] = rows(listed, c.prefix)
                # A time window leaves out a job cancelled before it was eligible: by id, then.
                unseen = [i for s, i in c.known if s == slurm and not by_id(sacct[slurm], i)]
                if unseen:
                    ids = dict.fromkeys([*unseen, *(i.split("_")[0] for i in unseen)])
                    listed += "\n" + run_slurm(cfg, [*SACCT, "-j", ",".join(ids)])
                    sacct[slurm] = rows(listed, c.prefix)
                squeue[slurm] = rows(run_slurm(cfg, SQUEUE), c.prefix)
            except remote.RemoteError as e:
                unreachable[slurm] = e.reason
                sacct.pop(slurm, None)
                squeue.pop(slurm, None)
        ask = [s for s in ask if s in sacct and lagging(s, sacct[s], squeue[s], c)]
        if not ask or time.monotonic() >= deadline:
            return sacct, squeue, unreachable
        time.sleep(1.0)


def lagging(slurm: str, sacct: Rows, squeue: Rows, c: Facts) -> bool:
    """Whether sacct does not know yet that a job the journal says ended has ended (or squeue
    shows one of the sweep's jobs COMPLETING, on its way out)."""
    for s, job_id in c.ended:
        if s == slurm and (by_id(sacct, job_id) or ("", "PENDING"))[1].split()[0] not in SLURM_DONE:
            return True
    return any(state == "COMPLETING" for _, state in squeue.values())


def rows(text: str, prefix: str) -> Rows:
    """`id|name|state` lines -> the sweep's jobs, an array's tasks that never started
    (`12_[3-9]`, one line) each under its own id."""
    lines = [line.strip().split("|") for line in text.splitlines()]
    return per_task(
        (parts[0], ("|".join(parts[1:-1]), parts[-1]))
        for parts in lines
        if len(parts) >= 3 and "|".join(parts[1:-1]).startswith(prefix)
    )


def default_run_slurm(cfg: dict, argv: list[str]) -> str:
    return remote.run(argv, login=cfg.get("login"), ssh_options=cfg.get("ssh_options") or (),
                      env=cfg.get("env") or None, timeout=SLURM_TIMEOUT_S).stdout  # fmt: skip


def launcher_running(sweep_dir: Path) -> bool:
    """Whether a launcher holds the sweep's lock: a shared flock, let go at once, tells."""
    try:
        fd = os.open(sweep_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
