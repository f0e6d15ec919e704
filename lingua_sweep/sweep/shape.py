"""A job's shape on a cluster (nodes, GPUs and tasks per node), the sbatch parameters that ask
for it, and how many jobs of that shape a cluster's probed nodes can start now."""

from dataclasses import dataclass
from typing import Any

from lingua_sweep.clusters import ClusterStatus
from lingua_sweep.config import ClusterConfig
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
