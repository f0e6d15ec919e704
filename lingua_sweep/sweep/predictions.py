"""What time-to-result placement predicted, read back from the journal (`forecast` records,
kept on each job as `forecast` and `planned`): the live view's and `status`'s words for a
waiting job, and the prediction errors `results` and the bench report against Slurm's own."""

import math
import statistics
import time
from typing import Any

from lingua_sweep.sweep.journal import JobEntry


def hhmm(epoch: float) -> str:
    if not math.isfinite(epoch):
        return "?"
    return time.strftime("%H:%M", time.localtime(epoch))


def pending_note(job: JobEntry) -> str | None:
    """The live view's and status's words for a queued or pending job's forecast."""
    f = job.forecast
    if not f or job.started_at is not None or job.final:
        return None
    words = f"starts ~{hhmm(f['start'])}"
    if f.get("slurm_start") and abs(f["slurm_start"] - f["start"]) >= 60:
        words += f" (Slurm: {hhmm(f['slurm_start'])})"
    alt = f.get("alt") or {}
    if alt:
        name, finish = min(alt.items(), key=lambda kv: kv[1])
        words += f"; {name} would finish ~{hhmm(finish)}"
    return words


def slurm_estimate(plan: dict[str, Any]) -> float | None:
    """Slurm's own estimate of a placed job's start: its first `squeue --start` there, else the
    `sbatch --test-only` answer the placement saw (epoch)."""
    return plan.get("slurm_own") or plan.get("slurm_start")


def prediction_errors(jobs: list[JobEntry]) -> dict[str, dict[str, Any]]:
    """Per cluster, over the jobs that started where they were placed: median absolute error of
    the predicted start, of Slurm's own estimate (where it gave one) and of the run time (s)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for job in jobs:
        plan = job.planned
        if not plan or job.started_at is None or plan.get("cluster") != job.cluster:
            continue
        row = rows.setdefault(job.cluster, {"start": [], "slurm": [], "run": []})
        row["start"].append(abs(job.started_at - plan["start"]))
        if slurm := slurm_estimate(plan):
            row["slurm"].append(abs(job.started_at - slurm))
        if plan.get("run_s") is not None and job.ended_at and job.state == "COMPLETED":
            row["run"].append(abs(job.ended_at - job.started_at - plan["run_s"]))
    return {
        name: {"jobs": len(row["start"]),
               **{f"{k}_error_s": statistics.median(v) if v else None for k, v in row.items()}}
        for name, row in sorted(rows.items())
    }  # fmt: skip
