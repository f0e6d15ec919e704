"""A user's Slurm limits on a cluster, what is used of them, and what an sbatch refusal means.

On a shared cluster, free nodes are not free to everyone: a QOS or an association caps the jobs,
submissions and GPUs of each user. The agent reads the caps (`sacctmgr show assoc/qos`,
`scontrol show config`) and the user's own active jobs (`squeue`); the dispatcher counts room
within them, so a sweep never submits what Slurm must refuse nor waits for room it cannot use.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# (Limits field, sacctmgr's qos/assoc columns that set it), tightest wins.
QOS_COLUMNS = ("Name", "MaxJobsPU", "MaxSubmitPU", "MaxTRESPU", "GrpJobs", "GrpSubmit", "GrpTRES")
ASSOC_COLUMNS = ("Account", "Partition", "QOS", "DefaultQOS", "MaxJobs", "MaxSubmit", "GrpJobs",
                 "GrpSubmit", "GrpTRES")  # fmt: skip
LIMIT_OF = {
    "max_jobs": ("MaxJobsPU", "MaxJobs", "GrpJobs"),
    "max_submit": ("MaxSubmitPU", "MaxSubmit", "GrpSubmit"),
    "max_gpus": ("MaxTRESPU", "GrpTRES"),
}
SETTING = {  # the words a person sees for each column
    "MaxJobsPU": "MaxJobsPerUser", "MaxSubmitPU": "MaxSubmitJobsPerUser",
    "MaxTRESPU": "MaxTRESPerUser", "MaxJobs": "MaxJobs", "MaxSubmit": "MaxSubmitJobs",
    "GrpJobs": "GrpJobs", "GrpSubmit": "GrpSubmitJobs", "GrpTRES": "GrpTRES",
}  # fmt: skip


@dataclass(kw_only=True)
class Limits:
    max_jobs: int | None = None  # running jobs of this user
    max_submit: int | None = None  # pending + running jobs of this user
    max_gpus: int | None = None  # GPUs in this user's running jobs
    max_array: int | None = None  # tasks in one job array (MaxArraySize)
    why: dict[str, str] = field(default_factory=dict)  # field -> "QOS capped MaxJobsPerUser=1"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Limits":
        return cls(**(data or {}))


@dataclass(kw_only=True)
class Usage:
    """The user's active jobs on a cluster other than this sweep's (ours the journal counts)."""

    running: int = 0
    active: int = 0  # pending or running
    gpus: int = 0  # in running jobs
    # When each running one reaches its time limit (epoch): under a limit they fill, our turn
    # comes by then at the latest (a sweep sent its jobs to another cluster's year-long queue
    # rather than wait for them).
    ends: list[float] = field(default_factory=list)


def tres_gpus(tres: str) -> int | None:
    """`cpu=4,gres/gpu=2` -> 2; None when GPUs are not limited."""
    for part in tres.split(","):
        key, _, value = part.partition("=")
        if key in ("gres/gpu", "gres/gpu:") or key.startswith("gres/gpu:"):
            return int(value) if value.isdigit() else None
    return None


def _number(value: str) -> int | None:
    return int(value) if value.strip().isdigit() else None


def parse_limits(assoc_out: str, qos_out: str, config_out: str, *, qos: str | None,
                 account: str | None) -> Limits:  # fmt: skip
    """Limits from `sacctmgr -n -P show assoc ... format=ASSOC_COLUMNS`, `... show qos
    format=QOS_COLUMNS` and `scontrol show config`."""
    limits = Limits()

    def tighten(name: str, value: int | None, why: str) -> None:
        current = getattr(limits, name)
        if value is not None and (current is None or value < current):
            setattr(limits, name, value)
            limits.why[name] = why

    rows = [dict(zip(ASSOC_COLUMNS, line.split("|"), strict=False))
            for line in assoc_out.splitlines() if line.strip()]  # fmt: skip
    # The user's own association for the account in use (a partition's own one is not ours).
    rows = [r for r in rows if not r.get("Partition") and (not account or r["Account"] == account)]
    assoc = rows[0] if rows else {}

    def tighten_from(row: dict[str, str], source: str) -> None:
        for name, columns in LIMIT_OF.items():
            for column in (c for c in columns if c in row):
                value = tres_gpus(row[column]) if name == "max_gpus" else _number(row[column])
                tighten(name, value, f"{source} {SETTING[column]}")

    tighten_from(assoc, f"association {assoc.get('Account')}")
    in_use = qos or assoc.get("DefaultQOS") or "normal"
    for line in qos_out.splitlines():
        row = dict(zip(QOS_COLUMNS, line.split("|"), strict=False))
        if row.get("Name") == in_use:
            tighten_from(row, f"QOS {in_use}")
    for line in config_out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize" and value.strip().isdigit():
            # MaxArraySize=N allows indices 0..N-1: arrays of at most N tasks.
            limits.max_array = int(value.strip())
            limits.why["max_array"] = f"MaxArraySize={limits.max_array}"
    return limits


def parse_usage(
    squeue_out: str, prefix: str | None, end_of: Callable[[str], float | None] | None = None
) -> Usage:
    """Usage from `squeue -h -r -u USER -o %i|%T|%r|%j|%D|%b|%S|%e` (one line per array task),
    leaving out this sweep's own jobs (named `prefix...`); `end_of` reads %e as an epoch."""
    usage = Usage()
    for line in squeue_out.splitlines():
        parts = (line.strip().split("|") + [""] * 8)[:8]
        if not parts[0] or (prefix and parts[3].startswith(prefix)):
            continue
        usage.active += 1
        if parts[1] in ("RUNNING", "COMPLETING", "SUSPENDED"):
            usage.running += 1
            nodes = int(parts[4]) if parts[4].isdigit() else 1
            usage.gpus += nodes * gres_gpus(parts[5])
            if end_of is not None and (end := end_of(parts[7])) is not None:
                usage.ends.append(end)
    return usage


def gres_gpus(gres: str) -> int:
    """squeue's %b (`gres:gpu:2`, `gres/gpu:a100:4`, `N/A`) -> GPUs per node."""
    for part in gres.replace("gres/", "gres:").split(","):
        fields = part.split(":")
        if "gpu" in fields and fields[-1].isdigit():
            return int(fields[-1])
    return 0


@dataclass(frozen=True)
class Headroom:
    start: int | None  # more jobs that may run now (None: no limit)
    submit: int | None  # more jobs that may be submitted now


def headroom(limits: Limits, usage: Usage, *, ours_running: int, ours_active: int,
             gpus_per_job: int) -> Headroom:  # fmt: skip
    """What the limits leave for this sweep, given the user's other jobs and ours."""
    start = None
    if limits.max_jobs is not None:
        start = limits.max_jobs - usage.running - ours_running
    if limits.max_gpus is not None and gpus_per_job:
        by_gpus = (limits.max_gpus - usage.gpus - ours_running * gpus_per_job) // gpus_per_job
        start = by_gpus if start is None else min(start, by_gpus)
    submit = None
    if limits.max_submit is not None:
        submit = limits.max_submit - usage.active - ours_active
    return Headroom(
        start=None if start is None else max(0, start),
        submit=None if submit is None else max(0, submit),
    )


# --- sbatch refusals ------------------------------------------------------------------------

# Refusals that pass once the user's other jobs end or slurmctld catches its breath.
TRANSIENT = (
    "MaxSubmitJob", "SubmitJobsLimit", "SubmitJobLimit", "temporarily unable",
    "Socket timed out", "Resource temporarily unavailable", "try again",
)  # fmt: skip
# Refusals of an array's size: the same jobs go in smaller arrays.
TOO_BIG = ("array index too large", "MaxArraySize", "Invalid job array specification")


def classify_refusal(text: str) -> tuple[str, str]:
    """(kind, the line that names why) for sbatch's error text. kind: "transient" (back off
    and retry), "too_big" (split the array) or "permanent" (the jobs cannot run as asked)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # sbatch names the limit on its own line (`sbatch: error: QOSMaxSubmitJobPerUserLimit`)
    # before the generic "Batch job submission failed: ..." line.
    errors = [line.split("error:", 1)[-1].strip() for line in lines if "error:" in line]
    why = "; ".join(dict.fromkeys(errors)) or (lines[-1] if lines else "sbatch refused")
    for kind, needles in (("too_big", TOO_BIG), ("transient", TRANSIENT)):
        if any(n.lower() in text.lower() for n in needles):
            return kind, why
    return "permanent", why
