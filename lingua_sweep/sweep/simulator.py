"""A simulated Slurm cluster behind the Backend protocol: measure the controller at 10,000 jobs
and compare placement policies, with no Slurm and no GPU.

A cluster is `simulated:` in its config (the fields of `SimSpec`); `make_backend` then hands the
controller a `SimBackend`, and the controller drives it exactly as it drives a real cluster:
probe, fenced submissions of arrays, polls with pending reasons, scancels, limits. One
`SimCluster` per cluster name lives in the process (`sim_backend.cluster_for`), so a second
controller in the same process sees the same queue.

The model: nodes with GPUs and CPUs; a queue started first-fit in submission order (FIFO with
backfill, within `backfill_depth` jobs as Slurm's bf_max_job_test); job durations lognormal
around `duration_s`; failures, preemptions and node failures at given rates; a background
user's jobs at a given load; jobs invisible to squeue/sacct for `visibility_lag_s` after sbatch
(slurmdbd's lag); sbatch taking `submit_latency_s`. Time runs `speed` times faster than the
sweep's clock: the wall clock, or virtual time (`clock: virtual`, sweep/clock.py), on which a
simulated day takes the launcher's CPU time only. A finished job writes what a real one
writes in its dir (status.json, metrics.jsonl, .hydra/overrides.yaml), so `results` reads it
as it would a real sweep.

`SimCluster.cpu_s` counts the CPU the simulator itself spends (thread time inside its calls),
so a benchmark can tell the launcher's cost from the simulated cluster's.
"""

import heapq
import itertools
import math
import random
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lingua_sweep.clusters import ClusterStatus, NodeRoom
from lingua_sweep.sweep import clock, layout, sim_estimates
from lingua_sweep.sweep.limits import Limits
from lingua_sweep.sweep.sim_jobs import SimJob, metrics, write_outputs
from lingua_sweep.sweep.states import WHY_FAILED

CLOCKS = ("wall", "virtual")
ENDS_TO_OUTCOME = {"PREEMPTED": "RESUBMIT", "NODE_FAIL": "RESUBMIT"}


@dataclass(kw_only=True)
class SimSpec:
    nodes: int = 4
    gpus_per_node: int = 8
    cpus_per_node: int = 64
    duration_s: float = 60.0  # median run time of a job, in simulated seconds
    duration_sigma: float = 0.25  # lognormal spread of run times
    fail_rate: float = 0.0  # a job raises (FAILED)
    preempt_rate: float = 0.0  # a job is preempted (PREEMPTED: the launcher resubmits it)
    node_fail_rate: float = 0.0  # a job's node fails (NODE_FAIL)
    background_load: float = 0.0  # share of GPUs another user keeps busy, on average
    background_gpus: int = 8  # GPUs per background job
    background_duration_s: float = 600.0
    # What another user asks for as a time limit, in multiples of the mean duration: Slurm's
    # start estimates assume every running job runs to its limit, so they come out late.
    background_limit_factor: float = 3.0
    visibility_lag_s: float = 0.0  # a new job is absent from squeue/sacct this long (real s)
    submit_latency_s: float = 0.0  # wall time of one sbatch (real s)
    max_array_size: int = 1001
    max_jobs: int | None = None  # the user's running-jobs limit (a QOS's MaxJobsPerUser)
    max_submit: int | None = None  # the user's pending + running limit (MaxSubmitJobsPerUser)
    backfill_depth: int = 500
    speed: float = 1.0  # simulated seconds per second of the sweep's clock
    # "virtual": the whole sweep runs on virtual time (sweep/clock.py); every cluster says so.
    clock: str = "wall"
    seed: int = 0
    # Simulated seconds of the other user's jobs before the sweep arrives: queues as they are.
    warmup_s: float = 0.0
    # Maintenance reservations: {"start_s": from the sweep's arrival, "duration_s", "nodes": how
    # many of the cluster's (the first ones; all if absent)}. As in Slurm, a job starts on a node
    # only if its time limit ends before the reservation begins; sinfo calls the node idle until
    # then, and "maint" during it.
    reservations: list[dict[str, float]] = field(default_factory=list)


class SimCluster:
    def __init__(self, name: str, spec: SimSpec):
        self.name, self.spec = name, spec
        self.rng = random.Random(spec.seed)  # our jobs' durations and ends
        # The other user's trace on its own stream: the same whatever our jobs do.
        self.background_rng = random.Random(spec.seed + 7919)
        self.free_gpus = [spec.gpus_per_node] * spec.nodes
        self.free_cpus = [spec.cpus_per_node] * spec.nodes
        self.jobs: dict[str, SimJob] = {}
        self.queue: list[str] = []  # pending, in priority (submission) order
        self.ends: list[tuple[float, str]] = []  # heap of (simulated end, id) of running jobs
        self.lock = threading.RLock()
        self.t0 = clock.monotonic()
        self.next_id = itertools.count(1000)
        self.next_background = 0.0
        self.active: set[str] = set()  # pending or running
        self.running_mine = self.pending_mine = 0
        self.calls: dict[str, int] = {}  # what the controller asked, by kind (calibration)
        self.changes = 0  # jobs that came, started or ended: what Slurm's plans depend on
        self.plan_kept: tuple | None = None  # sim_estimates' last backfill plan
        self.cpu_s = 0.0
        self.max_running = 0
        # sacct's history: the share of its time limit each of the other user's jobs used
        self.others_used: deque[float] = deque(maxlen=500)
        # (start, end, nodes) in simulated time
        self.reservations = [
            (spec.warmup_s + r["start_s"], spec.warmup_s + r["start_s"] + r["duration_s"],
             range(min(int(r.get("nodes", spec.nodes)), spec.nodes)))
            for r in spec.reservations
        ]  # fmt: skip
        self.warmup = 0.0
        for t in range(0, int(spec.warmup_s), 30):
            self.advance(float(t))
        self.warmup = spec.warmup_s
        self.t0 = clock.monotonic()

    def now(self) -> float:
        return self.warmup + (clock.monotonic() - self.t0) * self.spec.speed

    # --- the scheduler ----------------------------------------------------------------------

    def advance(self, now: float | None = None) -> None:
        """Everything up to now: ends, background arrivals, then starts."""
        now = self.now() if now is None else now
        while self.ends and self.ends[0][0] <= now:
            t, job_id = heapq.heappop(self.ends)
            self._end(self.jobs[job_id], t)
        self._background(now)
        self._start(now)

    def node_name(self, node: int) -> str:
        return f"{self.name}{node}"

    def reserved(self, node: int, t: float, job: SimJob) -> bool:
        """Whether a reservation keeps the job (its time limit) off the node at time t."""
        limit = sim_estimates.limit_of(job)
        return any(start < t + limit and end > t and node in nodes
                   for start, end, nodes in self.reservations)  # fmt: skip

    def _end(self, job: SimJob, t: float, state: str | None = None) -> None:
        if job.state != "RUNNING":
            return
        job.state, job.end = state or job.end_as, t
        self.active.discard(job.id)
        self.changes += 1
        self.running_mine -= job.user == "me"
        if job.user != "me" and job.start is not None and math.isfinite(job.time_limit):
            self.others_used.append(min((t - job.start) / job.time_limit, 1.0))
        for n in job.on:
            self.free_gpus[n] += job.gpus
            self.free_cpus[n] += job.cpus
        if job.job_dir is not None:
            write_outputs(job, self.name)

    def _background(self, now: float) -> None:
        s = self.spec
        if s.background_load <= 0:
            return
        # Poisson arrivals at the rate that keeps `background_load` of the GPUs busy.
        total = s.nodes * max(s.gpus_per_node, 1)
        rate = s.background_load * total / (s.background_gpus * s.background_duration_s)
        while self.next_background <= now:
            gpus = min(s.background_gpus, s.gpus_per_node) if s.gpus_per_node else 0
            duration = self.background_rng.expovariate(1 / s.background_duration_s)
            limit = max(duration * 1.2, s.background_duration_s * s.background_limit_factor)
            job = SimJob(id=str(next(self.next_id)), name="background", user="other", gpus=gpus,
                         cpus=1, nodes=1, submitted=clock.monotonic(), duration=duration,
                         time_limit=limit)  # fmt: skip
            self.enqueue(job)
            self.next_background += self.background_rng.expovariate(rate)

    def _start(self, now: float) -> None:
        if not self.queue or not any(self.free_cpus):
            return
        started, resources_noted = [], False
        for job_id in self.queue[: self.spec.backfill_depth]:
            job = self.jobs[job_id]
            if job.user == "me" and self.running_mine >= (self.spec.max_jobs or math.inf):
                job.reason = "QOSMaxJobsPerUserLimit"
                continue
            gpus, cpus = self.free_gpus, self.free_cpus
            nodes = [n for n in range(len(gpus)) if gpus[n] >= job.gpus and cpus[n] >= job.cpus]
            if self.reservations and len(nodes) >= job.nodes:
                nodes = [n for n in nodes if not self.reserved(n, now, job)]
                if len(nodes) < job.nodes:
                    job.reason = "ReqNodeNotAvail, Reserved for maintenance"
                    continue
            if len(nodes) < job.nodes:
                job.reason = "Priority" if resources_noted else "Resources"
                resources_noted = True
                if not any(self.free_cpus):
                    break
                continue
            job.on = nodes[: job.nodes]
            for n in job.on:
                self.free_gpus[n] -= job.gpus
                self.free_cpus[n] -= job.cpus
            job.state, job.start, job.reason = "RUNNING", now, "None"
            self.running_mine += job.user == "me"
            self.pending_mine -= job.user == "me"
            heapq.heappush(self.ends, (now + min(job.duration, job.time_limit), job.id))
            started.append(job_id)
        if started:
            self.changes += 1
            gone = set(started)
            self.queue = [i for i in self.queue if i not in gone]
        self.max_running = max(self.max_running, self.running_mine)

    def enqueue(self, job: SimJob) -> None:
        self.jobs[job.id] = job
        self.queue.append(job.id)
        self.active.add(job.id)
        self.changes += 1
        self.pending_mine += job.user == "me"

    # --- what the agent does on a real cluster ---------------------------------------------

    def _counted(self, kind: str):
        self.calls[kind] = self.calls.get(kind, 0) + 1
        return _CpuClock(self)

    def submit(self, tasks: list, *, folder: str, params: dict, batch: str) -> dict[str, Any]:
        with self._counted("submit"):
            if len(tasks) > self.spec.max_array_size:
                return {"refused": f"Invalid job array specification (MaxArraySize="
                        f"{self.spec.max_array_size})", "kind": "too_big"}  # fmt: skip
            mine = self.pending_mine + self.running_mine
            if mine + len(tasks) > (self.spec.max_submit or math.inf):
                return {"refused": "QOSMaxSubmitJobPerUserLimit", "kind": "transient"}
            with self.lock:
                self.advance()
                base = str(next(self.next_id))
                ids = [f"{base}_{k}" for k in range(len(tasks))] if len(tasks) > 1 else [base]
                s = self.spec
                limit = (params.get("time") or math.inf) * 60
                for job_id, task in zip(ids, tasks, strict=True):
                    config = task.config  # a compose.JobConfig
                    job_dir = layout.job_dir(str(config.template.hydra.sweep.dir), config.num)
                    spread = math.exp(self.rng.gauss(0, s.duration_sigma))
                    cpus = params.get("ntasks_per_node", 1) * (params.get("cpus_per_task") or 1)
                    job = SimJob(id=job_id, name=batch, user="me", nodes=params.get("nodes", 1),
                                 gpus=params.get("gpus_per_node") or 0, cpus=cpus,
                                 duration=s.duration_s * spread, submitted=clock.monotonic(),
                                 end_as=self._draw_end(), time_limit=limit, job_dir=job_dir,
                                 overrides=list(config.task))  # fmt: skip
                    if job.duration > limit:
                        job.end_as = "TIMEOUT"
                    self.enqueue(job)
                self.advance()
        if self.spec.submit_latency_s:
            clock.sleep(self.spec.submit_latency_s)
        return {"ids": ids}

    def _draw_end(self) -> str:
        s, u = self.spec, self.rng.random()
        for state, rate in (("FAILED", s.fail_rate), ("PREEMPTED", s.preempt_rate),
                            ("NODE_FAIL", s.node_fail_rate)):  # fmt: skip
            if u < rate:
                return state
            u -= rate
        return "COMPLETED"

    def find(self, batch: str, *, cancel: bool = False) -> list[str]:
        with self._counted("resolve"), self.lock:
            ids = [j.id for j in self.jobs.values() if j.name == batch]
        if cancel:
            self.cancel(ids)
        return ids

    def cancel(self, ids: list[str]) -> None:
        with self._counted("cancel"), self.lock:
            self.advance()
            now = self.now()
            for job_id in ids:
                job = self.jobs.get(job_id)
                if job is None or job.state not in ("PENDING", "RUNNING"):
                    continue
                if job.state == "PENDING":
                    job.state, job.end = "CANCELLED", now
                    self.queue.remove(job_id)
                    self.active.discard(job_id)
                    self.changes += 1
                    self.pending_mine -= job.user == "me"
                else:
                    self._end(job, now, "CANCELLED")
            self._start(now)

    def poll(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._counted("poll"), self.lock:
            self.advance()
            now, wall = self.now(), clock.monotonic()
            states, outcomes, files = {}, {}, {}
            starts = None
            for j in request.get("jobs", []):
                job = self.jobs.get(j["id"])
                if job is None or wall - job.submitted < self.spec.visibility_lag_s:
                    states[j["id"]] = {"state": "UNKNOWN"}
                    continue
                info = {"state": job.state, "ran": job.start is not None}
                if job.state == "PENDING":
                    info["reason"] = job.reason
                    if starts is None:
                        starts = sim_estimates.pending_starts(self)
                    if job.id in starts:
                        info["start"] = starts[job.id]
                states[j["id"]] = info
                if job.end is not None:
                    outcomes[j["id"]] = self._outcome(job)
            by_dir = {f"{j.job_dir}/{layout.METRICS_FILE}": j for j in self._ours(request)}
            for path, offset in request.get("files", {}).items():
                job = by_dir.get(path)
                if job is not None and job.start is not None:
                    text = metrics(job, now)
                    start = offset if offset is not None and offset <= len(text) else 0
                    files[path] = {"start": start, "end": len(text), "text": text[start:]}
            prefix = request.get("prefix") or "\0"
            named = {j.id: j.name for j in map(self.jobs.get, self.active)
                     if j.name.startswith(prefix)
                     and wall - j.submitted >= self.spec.visibility_lag_s}  # fmt: skip
            return {"states": states, "outcomes": outcomes, "files": files, "named": named,
                    "usage": {}}  # fmt: skip

    def _ours(self, request: dict[str, Any]) -> list[SimJob]:
        return [self.jobs[j["id"]] for j in request.get("jobs", []) if j["id"] in self.jobs]

    def _outcome(self, job: SimJob) -> dict[str, Any]:
        if job.state == "COMPLETED":
            return {"status": "COMPLETED", "value": 3.0 + (int(job.id.split("_")[0]) % 97) / 97}
        if job.state == "CANCELLED":
            return {"status": "CANCELLED", "error": "cancelled (scancel)"}
        if job.state in ENDS_TO_OUTCOME:
            return {"status": ENDS_TO_OUTCOME[job.state], "error": WHY_FAILED[job.state]}
        why = WHY_FAILED.get(job.state, "simulated failure: the task raised")
        return {"status": "FAILED", "error": why}

    # --- Slurm's start estimates (squeue --start, sbatch --test-only) ------------------------

    def estimate(self, params: dict) -> float | None:
        """sbatch --test-only: when a job of this shape submitted now would start."""
        with self._counted("estimate"), self.lock:
            self.advance()
            cpus = params.get("ntasks_per_node", 1) * (params.get("cpus_per_task") or 1)
            probe = SimJob(id="test-only", name="test-only", user="me", cpus=cpus,
                           gpus=params.get("gpus_per_node") or 0, nodes=params.get("nodes", 1),
                           duration=0.0, submitted=clock.monotonic(),
                           time_limit=(params.get("time") or math.inf) * 60)  # fmt: skip
            return sim_estimates.test_only_start(self, probe)

    def reserved_nodes(self, params: dict) -> dict[str, list[float]]:
        """scontrol show reservation, for a job of these sbatch parameters (sim_estimates)."""
        with self._counted("reservations"), self.lock:
            self.advance()
            limit = (params.get("time") or math.inf) * 60
            return sim_estimates.reserved_nodes(self, min(limit, sim_estimates.DEFAULT_LIMIT_S))

    def others_time_used(self) -> float | None:
        """sacct's view of the other users' jobs that ended: the median share of its time
        limit each used."""
        with self._counted("history"), self.lock:
            self.advance()
            return statistics.median(self.others_used) if len(self.others_used) >= 3 else None

    def probe(self) -> ClusterStatus:
        with self._counted("probe"), self.lock:
            self.advance()
            now = self.now()
            maint = {n for start, end, nodes in self.reservations if start <= now < end
                     for n in nodes}  # fmt: skip
            nodes = [NodeRoom(name=self.node_name(n), state="maint" if n in maint else "idle"
                              if self.free_cpus[n] else "alloc", free_cpus=self.free_cpus[n],
                              free_gpus=self.free_gpus[n])
                     for n in range(self.spec.nodes)]  # fmt: skip
            idle = sum(1 for n in range(self.spec.nodes)
                       if self.free_gpus[n] == self.spec.gpus_per_node and n not in maint
                       and self.free_cpus[n] == self.spec.cpus_per_node)  # fmt: skip
            return ClusterStatus(name=self.name, state="idle" if idle else "busy",
                                 idle_nodes=idle, total_nodes=self.spec.nodes, reason=None,
                                 elapsed_s=0.0, nodes=nodes)  # fmt: skip

    def limits(self) -> tuple[Limits, dict[str, int]]:
        with self._counted("limits"):
            s = self.spec
            why = {
                "max_jobs": f"QOS sim MaxJobsPerUser={s.max_jobs}",
                "max_submit": f"QOS sim MaxSubmitJobsPerUser={s.max_submit}",
            }
            why = {k: v for k, v in why.items() if getattr(s, k) is not None}
            return Limits(max_jobs=s.max_jobs, max_submit=s.max_submit,
                          max_array=s.max_array_size, why=why), {}  # fmt: skip


class _CpuClock:
    """Adds the thread's CPU time spent inside a simulator call to the cluster's account."""

    def __init__(self, cluster: SimCluster):
        self.cluster = cluster

    def __enter__(self):
        self.t = time.thread_time()

    def __exit__(self, *exc):
        with self.cluster.lock:
            self.cluster.cpu_s += time.thread_time() - self.t
