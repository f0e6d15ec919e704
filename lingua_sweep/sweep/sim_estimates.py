"""Slurm's start estimates on a simulated cluster, made as the testbed's Slurm made them: every
running job runs to its time limit, and pending jobs are planned in priority order (the first
`backfill_depth` of them: Slurm leaves the rest without one). Nobody else submits.

`squeue --start` (pending jobs): the backfill scheduler's plan. Under a reservation each job is
planned at the earliest time nodes are free for its whole limit; a job held by the reservation
starts at its end, and one whose limit ends before it begins may go ahead (the simulator
starts it then too, as Slurm did).

`sbatch --test-only` (a job not yet submitted): after the pending jobs, planned as if no
reservation held them, the new job alone kept clear of reservations. So it can be late: on the
testbed, a 5-minute job was told 60 minutes (a pending job's limit, held by a maintenance
reservation), and Slurm started one like it at once.
"""

import heapq
import math

from lingua_sweep.sweep import clock
from lingua_sweep.sweep.slurm_queries import DEFAULT_TIME_MIN, kept_nodes

# Functions of a `simulator.SimCluster` (`cluster`) and its `SimJob`s, read only; untyped here,
# as the simulator imports this module.

DEFAULT_LIMIT_S = DEFAULT_TIME_MIN * 60.0  # a job without --time


def limit_of(job) -> float:
    return min(job.time_limit, DEFAULT_LIMIT_S)


def pending_starts(cluster) -> dict[str, float]:
    """`squeue --start` of each pending job (id -> wall-clock epoch)."""
    now, pending = cluster.now(), _pending(cluster)
    starts = _kept_backfill(cluster, pending, now) if cluster.reservations else _in_order(
        cluster, pending, now)  # fmt: skip
    return {i: _epoch(cluster, now, t) for i, t in starts.items()}


def _kept_backfill(cluster, pending: list, now: float) -> dict[str, float]:
    """The backfill plan, made again only when a job came, started or ended, or the clock
    passed a time the plan turns on (a planned start, a running job's limit, a reservation's
    start or end): until then, the same plan made now would be this one. (Made at every poll
    it was 90% of a simulated maintenance sweep's CPU.)"""
    key = (cluster.changes, tuple(j.id for j in pending))
    kept = cluster.plan_kept
    if kept is not None and kept[0] == key and (now == kept[1] or now < kept[2]):
        return kept[3]
    starts = _backfill(cluster, pending, now)
    turns = [*starts.values(), *(start for start, _, _ in cluster.reservations),
             *(end for _, end, _ in cluster.reservations),
             *(j.start + limit_of(j) for j in map(cluster.jobs.get, cluster.active)
               if j.start is not None)]  # fmt: skip
    # A job planned to start now that has not started is a plan to make again at once.
    now_or_later = (
        [t for t in turns if t > now] if min(starts.values(), default=math.inf) > now else [now]
    )
    cluster.plan_kept = (key, now, min(now_or_later, default=math.inf), starts)
    return starts


def test_only_start(cluster, new) -> float | None:
    """`sbatch --test-only` for `new`, a job not yet submitted (wall-clock epoch)."""
    now = cluster.now()
    start = _in_order(cluster, [*_pending(cluster), new], now, clear_of_reservations=new)
    return _epoch(cluster, now, start[new.id]) if new.id in start else None


def reserved_nodes(cluster, limit: float) -> dict[str, list[float]]:
    """The nodes a reservation covers, now or later: sinfo's name -> [from, until], when a job
    of this time limit cannot start on it (wall-clock epoch)."""
    now = cluster.now()
    kept = kept_nodes([(start, end, [cluster.node_name(n) for n in nodes])
                       for start, end, nodes in cluster.reservations], now, limit)  # fmt: skip
    return {node: [_epoch(cluster, now, t) for t in window] for node, window in kept.items()}


def _pending(cluster) -> list:
    order = [cluster.jobs[i] for i in cluster.queue[: cluster.spec.backfill_depth]]
    # A job held by a limit of ours, not by nodes: Slurm gives it no start (N/A).
    return [j for j in order if not j.reason.startswith("QOS")]


def _epoch(cluster, now: float, t: float) -> float:
    return clock.now() + (t - now) / cluster.spec.speed


def _in_order(cluster, jobs: list, now: float, clear_of_reservations=None) -> dict[str, float]:
    """Each job at the first end of a running (or planned) job that frees room for it, never
    before the job ahead of it."""
    events = [(j.start + limit_of(j), j.id)
              for j in map(cluster.jobs.get, cluster.active) if j.state == "RUNNING"]  # fmt: skip
    if clear_of_reservations is not None:
        events += [(end, "") for _, end, _ in cluster.reservations if end > now]  # "": no job
    heapq.heapify(events)
    gpus, cpus = list(cluster.free_gpus), list(cluster.free_cpus)
    held = {j.id: (j.on, j.gpus, j.cpus) for j in map(cluster.jobs.get, cluster.active) if j.on}
    t, out = now, {}
    for job in jobs:
        while True:
            fit = [n for n in range(len(gpus)) if gpus[n] >= job.gpus and cpus[n] >= job.cpus
                   and (job is not clear_of_reservations
                        or not cluster.reserved(n, t, job))]  # fmt: skip
            if len(fit) >= job.nodes or not events:
                break
            end, done = heapq.heappop(events)
            t = max(t, end)
            on, g, c = held.pop(done, ((), 0, 0))
            for n in on:
                gpus[n] += g
                cpus[n] += c
        if len(fit) < job.nodes:
            break  # larger than the whole cluster: no estimate
        on = fit[: job.nodes]
        for n in on:
            gpus[n] -= job.gpus
            cpus[n] -= job.cpus
        held[job.id] = (on, job.gpus, job.cpus)
        heapq.heappush(events, (t + limit_of(job), job.id))
        out[job.id] = t
    return out


def _backfill(cluster, jobs: list, now: float) -> dict[str, float]:
    """Each job at the earliest time its nodes are free for its whole limit, around what is
    planned and reserved: per node, (start, end, GPUs, CPUs) holds."""
    spec = cluster.spec
    holds: list[list[tuple[float, float, int, int]]] = [[] for _ in range(spec.nodes)]
    for j in map(cluster.jobs.get, cluster.active):
        for n in j.on:
            holds[n].append((now, j.start + limit_of(j), j.gpus, j.cpus))
    for start, end, nodes in cluster.reservations:
        for n in nodes:  # a reservation takes the node whole
            holds[n].append((start, end, spec.gpus_per_node, spec.cpus_per_node))
    out = {}
    for job in jobs:
        limit = limit_of(job)
        ends = {end for node in holds for _, end, _, _ in node if end > now}
        for t in sorted(ends | {now}):
            fit = [n for n in range(spec.nodes) if _fits(holds[n], t, t + limit, job, spec)]
            if len(fit) >= job.nodes:
                for n in fit[: job.nodes]:
                    holds[n].append((t, t + limit, job.gpus, job.cpus))
                out[job.id] = t
                break
    return out


def _fits(node: list[tuple[float, float, int, int]], t0: float, t1: float, job, spec) -> bool:
    """Whether the job's GPUs and CPUs are free on this node all through [t0, t1)."""
    overlapping = [h for h in node if h[0] < t1 and h[1] > t0]
    for point in [t0, *(h[0] for h in overlapping if h[0] > t0)]:
        gpus = cpus = 0
        for start, end, g, c in overlapping:
            if start <= point < end:
                gpus, cpus = gpus + g, cpus + c
        if gpus + job.gpus > spec.gpus_per_node or cpus + job.cpus > spec.cpus_per_node:
            return False
    return True
