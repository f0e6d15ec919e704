"""A job on a simulated cluster (`simulator.SimCluster`), and what it leaves in its dir as a
real one would (status.json, metrics.jsonl, .hydra/overrides.yaml), so `results` reads a
simulated sweep as it reads a real one."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lingua_sweep.sweep import job as job_lib
from lingua_sweep.sweep import layout

METRIC_LINES = 5  # metrics.jsonl lines a simulated job writes over its run


@dataclass
class SimJob:
    id: str
    name: str
    user: str
    gpus: int  # per node
    cpus: int  # per node
    nodes: int
    duration: float  # simulated seconds it runs, if nothing stops it
    submitted: float  # the sweep clock's monotonic time of the sbatch (visibility)
    end_as: str = "COMPLETED"
    time_limit: float = math.inf  # what it asked for (sbatch --time), in simulated seconds
    job_dir: str | None = None
    overrides: list[str] = field(default_factory=list)
    state: str = "PENDING"
    reason: str = "Priority"
    start: float | None = None  # simulated time
    end: float | None = None
    on: list[int] = field(default_factory=list)  # node indices


def write_outputs(job: SimJob, cluster: str) -> None:
    """What the job's own process writes in its dir on a real cluster, once it ended."""
    d = Path(job.job_dir)
    (d / ".hydra").mkdir(parents=True, exist_ok=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in job.overrides))
    (d / layout.METRICS_FILE).write_text(metrics(job, math.inf))
    status = "COMPLETED" if job.state == "COMPLETED" else "FAILED"
    job_lib.write_status(d, status=status, job_id=job.id, cluster=cluster, started=job.start,
                         step=steps_done(job, job.end))  # fmt: skip


def steps_done(job: SimJob, t: float) -> int:
    if job.start is None:
        return 0
    return min(METRIC_LINES, int(METRIC_LINES * (t - job.start) / max(job.duration, 1e-9)))


def metrics(job: SimJob, t: float) -> str:
    """The job's metrics.jsonl as far as it got by simulated time `t`: a falling loss."""
    done = steps_done(job, min(t, job.end if job.end is not None else t))
    base = 3.0 + (int(job.id) % 97) / 97
    return "".join(
        json.dumps({"step": k * 100, "loss/train": round(base + 1 / k, 4),
                    **({"loss/val": round(base + 1.1 / k, 4)} if k == METRIC_LINES else {})})
        + "\n" for k in range(1, done + 1)
    )  # fmt: skip
