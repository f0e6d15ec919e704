"""Slurm's start estimates on a simulated cluster (`squeue --start`, `sbatch --test-only`), made
as Slurm makes them: every running job runs to its time limit; pending jobs are planned in
priority order (the first `backfill_depth` of them: Slurm leaves the rest without one); a job
asked about with `--test-only` after them all (on the testbed's Slurm, a new job's start came
after a pending one's). Nobody else submits.

Under a reservation, each job is planned at the earliest time nodes are free for its whole time
limit, so one whose limit ends before the reservation begins goes ahead of those that cannot
(Slurm's backfill; the simulator starts it then too). Without one, jobs of one node never pass
each other, and a sweep of a thousand pending jobs costs no more than a pass over its queue.
"""

import heapq
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the simulator imports this module
    from lingua_sweep.sweep.simulator import SimCluster, SimJob

DEFAULT_LIMIT_S = 86400.0  # a job without --time: the partition's limit, as Slurm assumes it


def limit_of(job: "SimJob") -> float:
    return min(job.time_limit, DEFAULT_LIMIT_S)


def expected_starts(
    cluster: "SimCluster", new: "SimJob | None" = None
) -> tuple[dict[str, float], float | None]:
    """(pending job id -> Slurm's start, `new`'s start), as wall-clock epochs."""
    now = cluster.now()
    order = [cluster.jobs[i] for i in cluster.queue[: cluster.spec.backfill_depth]]
    # A job held by a limit of ours, not by nodes: Slurm gives it no start (N/A).
    jobs = [j for j in [*order, *([new] if new else [])] if not j.reason.startswith("QOS")]
    plan = _backfill if cluster.reservations else _in_order
    starts = plan(cluster, jobs, now)
    wall = time.time()
    epochs = {i: wall + (t - now) / cluster.spec.speed for i, t in starts.items()}
    new_start = epochs.pop(new.id, None) if new else None
    return epochs, new_start


def _in_order(cluster: "SimCluster", jobs: list["SimJob"], now: float) -> dict[str, float]:
    """Each job at the first end of a running (or planned) job that frees room for it, never
    before the job ahead of it."""
    events = [(j.start + limit_of(j), j.id)
              for j in map(cluster.jobs.get, cluster.active) if j.state == "RUNNING"]  # fmt: skip
    heapq.heapify(events)
    gpus, cpus = list(cluster.free_gpus), list(cluster.free_cpus)
    held = {j.id: (j.on, j.gpus, j.cpus) for j in map(cluster.jobs.get, cluster.active) if j.on}
    t, out = now, {}
    for job in jobs:
        while True:
            fit = [n for n in range(len(gpus)) if gpus[n] >= job.gpus and cpus[n] >= job.cpus]
            if len(fit) >= job.nodes or not events:
                break
            end, done = heapq.heappop(events)
            t = max(t, end)
            on, g, c = held.pop(done)
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


def _backfill(cluster: "SimCluster", jobs: list["SimJob"], now: float) -> dict[str, float]:
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
