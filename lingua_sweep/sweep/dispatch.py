"""Which queued job goes to which cluster now: capacity in the job's own units, priority order.

A job needs `nodes` nodes, each with `gpus_per_node` free GPUs (or, on a partition without
GPUs, `tasks_per_node * cpus_per_task` free CPUs). A cluster's room is how many such jobs its
idle and mixed nodes can start now, minus our own jobs already waiting in its queue (they will
take that room first). Pure functions of probe results: the controller does the I/O.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lingua_sweep.clusters import ClusterStatus
from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError
from lingua_sweep.sweep.params import LauncherParams


@dataclass(frozen=True, kw_only=True)
class JobShape:
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: int

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def job_shape(cluster: ClusterConfig, p: LauncherParams) -> JobShape:
    """The job's shape on this cluster: one task per GPU unless told otherwise."""
    gpus = cluster.gpus_per_node if p.gpus_per_node is None else p.gpus_per_node
    if not cluster.slurm:
        return JobShape(nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1)
    return JobShape(
        nodes=p.nodes,
        gpus_per_node=gpus,
        tasks_per_node=p.tasks_per_node or max(gpus, 1),
        cpus_per_task=p.cpus_per_task or 1,
    )


def sbatch_params(cluster: ClusterConfig, p: LauncherParams, job_name: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for a job of this sweep on this cluster."""
    shape = job_shape(cluster, p)
    return {
        "job_name": job_name,
        "partition": cluster.partition,
        "account": cluster.account,
        "qos": cluster.qos,
        "nodes": shape.nodes,
        "gpus_per_node": shape.gpus_per_node or None,
        "ntasks_per_node": shape.tasks_per_node,
        "cpus_per_task": p.cpus_per_task,
        "mem": f"{p.mem_gb}GB" if p.mem_gb else None,
        "time": p.timeout_min,
        "signal_delay_s": p.signal_delay_s,
        "exclude": ",".join(cluster.exclude) or None,
        "setup": [*cluster.job_setup, *p.setup] or None,
        # One failed task ends the job's other tasks at once instead of leaving them waiting in
        # a collective until the time limit.
        "srun_args": ["--kill-on-bad-exit=1"],
        "additional_parameters": dict(p.additional_parameters) or None,
        "max_num_timeout": p.max_num_timeout,
    }


def room(status: ClusterStatus, cluster: ClusterConfig, shape: JobShape) -> int:
    """How many jobs of this shape the cluster can start now."""
    if status.state not in ("idle", "busy") or shape.nodes > cluster.max_nodes:
        return 0
    if shape.gpus_per_node:
        per_node = [n.free_gpus // shape.gpus_per_node for n in status.nodes]
    else:
        cpus = shape.tasks_per_node * shape.cpus_per_task
        per_node = [n.free_cpus // cpus for n in status.nodes]
    if shape.nodes == 1:
        return sum(per_node)
    # A multi-node job needs `nodes` distinct nodes: take the roomiest ones, one share each.
    jobs, left = 0, sorted(per_node, reverse=True)
    while len([k for k in left if k > 0]) >= shape.nodes:
        for i in range(shape.nodes):
            left[i] -= 1
        jobs += 1
        left.sort(reverse=True)
    return jobs


def assign(
    n_queued: int,
    rooms: Mapping[str, int],
    order: Sequence[str],
    *,
    queue_on: str | None,
    when_busy: str,
    caps: Mapping[str, int | None] | None = None,
) -> list[str | None]:
    """The cluster for each of the first n queued jobs (None: keep waiting here).

    Clusters with room fill in priority order (`order`); the rest follow `when_busy`: `queue`
    sends them to `queue_on` (the first reachable cluster that fits them), `wait` keeps them.
    `caps`: how many more jobs each cluster's submit limit accepts (None: no limit); a job
    no cluster may take now waits here.
    """
    left = dict(rooms)
    cap = {n: v for n, v in (caps or {}).items() if v is not None}
    out: list[str | None] = []
    for _ in range(n_queued):
        target = next((n for n in order if left.get(n, 0) > 0 and cap.get(n, 1) > 0), None)
        if target is not None:
            left[target] -= 1
        elif when_busy == "queue" and queue_on is not None and cap.get(queue_on, 1) > 0:
            target = queue_on
        if target is not None and target in cap:
            cap[target] -= 1
        out.append(target)
    return out


def check_when_busy(
    n_without_room: int, n_jobs: int, reachable: Sequence[str], when_busy: str
) -> None:
    if when_busy == "fail" and n_without_room:
        raise UserError(
            f"{n_without_room} of {n_jobs} jobs find no room on {list(reachable)}; set "
            "hydra.launcher.when_busy=queue (queue them) or wait (hold them until room appears)"
        )


def should_move(
    pending_s: float, moves: int, max_pending_s: float | None, other_rooms: Mapping[str, int]
) -> bool:
    """A job waiting too long in one queue moves once, and only where a job can start now."""
    if max_pending_s is None or moves >= 1 or pending_s < max_pending_s:
        return False
    return any(r > 0 for r in other_rooms.values())
