"""Where a sweep's files are on each filesystem, and what its Slurm jobs are called.

A sweep's jobs write under a *base* dir: the sweep dir itself where the cluster shares this
machine's filesystem, else a dir on the cluster named after the sweep's id (two sweeps with the
same local dir name never share outputs or checkpoints). Job #i writes in `<base>/<i>`; the
submission fences (see agent.submit_fenced) live in `<base>/.submissions`.
"""

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the agent imports this module on login nodes: keep it light
    from lingua_sweep.config import ClusterConfig

STATUS_FILE = "status.json"  # beside metrics.jsonl: written by the job, then by the launcher
METRICS_FILE = "metrics.jsonl"
FENCE_DIR = ".submissions"


def job_dir(base: str | Path, index: int) -> str:
    return f"{str(base).rstrip('/')}/{index}"


def fence_dir(base: str | Path) -> str:
    return f"{str(base).rstrip('/')}/{FENCE_DIR}"


def remote_base(cluster: "ClusterConfig", name: str, local_sweep_dir: Path, sweep_id: str) -> str:
    """The base dir of a sweep on a cluster whose filesystem is not this machine's."""
    root = cluster.output_root.rstrip("/")
    return f"{root}/{name}/multirun/{local_sweep_dir.name}.{sweep_id}"


def batch_prefix(name: str, sweep_id: str) -> str:
    """Every Slurm job of a sweep has a name starting with this: how an orphan is recognised."""
    return f"{name}.{sweep_id}."


def batch_name(name: str, sweep_id: str, serial: int) -> str:
    return f"{batch_prefix(name, sweep_id)}{serial}"
