"""`lingua-sweep results`: the table of a sweep, read from its Hydra multirun directory.

Only files are read (no Slurm, no WandB), so it works mid-sweep, after the fact and on a copy.
Per job `<sweep dir>/<n>/`:
  .hydra/overrides.yaml   the job's overrides (which parameters were swept, and their values)
  config.yaml             the resolved TrainConfig; else Hydra's composed `.hydra/config.yaml`
  metrics.jsonl           one JSON object per line, each with `step`
  status.json             written by the multicluster launcher's job wrapper (may be absent)
  data.json               the data the trainer read (lingua_sweep.data.data_identity)
Optuna sweeps also write `<sweep dir>/optimization_results.yaml` at the end. A multicluster sweep
has `<sweep dir>/journal.jsonl`: where it exists, it is the truth on each job's final state
(PRUNED, CANCELLED), its trial number, the step it stopped at and its time on a node.

    rows = collect("outputs/lr_sweep/multirun/2025-01-01_12-00-00")
    results_table.print_table(rows); results_plot.plot(rows, sweep_dir, "sweep.png")
"""

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lingua_sweep import metrics as metrics_lib
from lingua_sweep.errors import UserError
from lingua_sweep.sweep.journal import JobEntry, Journal, SweepState
from lingua_sweep.sweep.layout import job_dir

STATUSES = ("COMPLETED", "FAILED", "PRUNED", "CANCELLED", "RUNNING", "PREEMPTED", "PENDING",
            "UNKNOWN")  # fmt: skip
# Rows that may carry the best marker: a finished run, else a running one (the leader so far).
BEST_CANDIDATES = (("COMPLETED",), ("RUNNING", "PREEMPTED"))
WITH_ERROR = ("FAILED", "PREEMPTED", "CANCELLED")
# submitit's wrapper around a job's own traceback: the line that says nothing.
SUBMITIT_WRAPPER = "failed during processing with trace"
# Override keys that never count as swept parameters: the cluster has its own column (and the
# launcher sets it per job, so it differs across jobs without being a parameter).
NOT_PARAMS = ("cluster",)

SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster


@dataclass(kw_only=True)
class JobResult:
    """One row of the table: one job of the sweep."""

    job: int  # Hydra's job number (the subdirectory name); Optuna's trial number too
    dir: Path
    params: dict[str, str] = field(default_factory=dict)  # swept override key -> value string
    cluster: str = ""
    status: str = "UNKNOWN"  # one of STATUSES
    error: str | None = None  # the exception line of the error, for FAILED/PREEMPTED/CANCELLED
    step: int | None = None  # last step logged; for a PRUNED trial, the step it was pruned at
    steps: int | None = None  # total steps configured
    final_val: float | None = None  # loss/val at the last step that has one
    best_val: float | None = None  # lowest loss/val seen
    tokens_per_s: float | None = None  # at the last step that has it
    wall_s: float | None = None  # on a node, every allocation of a requeued job counted
    wandb_run: str = ""  # `{name}_{cluster}_{job_id}`; empty when WandB never ran
    lr: float | None = None  # optim.lr and optim.scheduler, for the plot
    scheduler: str | None = None
    trial: int | None = None  # Optuna only
    objective: float | None = None  # Optuna only: the value the trial returned
    maximize: bool = False  # Optuna only: the study's direction
    best: bool = False
    data: str = ""  # the data's fingerprint (data.json, written by the trainer)


# --- reading ---------------------------------------------------------------------------------


def collect(sweep_dir: str | Path) -> list[JobResult]:
    """One row per job, sorted by final validation loss (missing last), the best one marked.

    The best row is the best objective (Optuna), else the lowest final val loss, among
    COMPLETED jobs; while none has completed, among running ones, so a sweep in progress still
    shows its leader. A failed, cancelled or pruned job is never the best.
    """
    sweep = Path(sweep_dir)
    journal = read_journal(sweep)
    jobs = journal.jobs if journal else {}
    job_dirs = find_job_dirs(sweep, also=jobs)
    hydra_cfg = sweep_hydra_config(sweep, job_dirs)
    # The journal's overrides are the job's (its dir's copy is Hydra's, written as it started).
    overrides = {
        num: overrides_dict(jobs[num].overrides) if num in jobs else read_overrides(d)
        for num, d in job_dirs.items()
    }
    # A job the journal has but that has no dir yet knows only its own overrides, not the
    # command line's: it must not make every other override look swept.
    with_dirs = [o for num, o in overrides.items() if job_dirs[num].is_dir()]
    swept = swept_keys(with_dirs or list(overrides.values()),
                       declared_sweep_keys(sweep, hydra_cfg))  # fmt: skip
    # optimization_results.yaml only appears when the study ends; the sweeper config is there
    # from the first trial.
    sweeper = str(_get(hydra_cfg, "sweeper._target_") or "")
    optuna = "optuna" in sweeper or (sweep / "optimization_results.yaml").exists()
    rows = [
        _job_result(num, d, overrides[num], swept, optuna=optuna, job=jobs.get(num))
        for num, d in job_dirs.items()
    ]
    maximize = wants_max(journal, hydra_cfg)
    for r in rows:
        r.maximize = maximize
    rows.sort(key=lambda r: (not finite(r.final_val), r.final_val or 0.0, r.job))
    for statuses in BEST_CANDIDATES:
        candidates = [r for r in rows if r.status in statuses and finite(r.final_val)]
        if not candidates:
            continue
        by_objective = [r for r in candidates if finite(r.objective)]
        if by_objective:
            pick = max if maximize else min
            best = pick(by_objective, key=lambda r: r.objective)
        else:  # rows are sorted, so the first candidate has the lowest final val loss
            best = candidates[0]
        best.best = True
        break
    return rows


def read_journal(sweep: Path) -> SweepState | None:
    """The multicluster launcher's journal of the sweep, if it has one (read without its lock)."""
    journal = Journal(sweep)
    return journal.replay() if journal.exists() else None


def wants_max(journal: SweepState | None, hydra_cfg: dict) -> bool:
    directions = ((journal.header.get("study") or {}).get("directions") if journal else None) or [
        _get(hydra_cfg, "sweeper.direction")
    ]
    return str(directions[0]).lower().endswith("maximize")


def find_job_dirs(sweep: Path, also: Iterable[int] = ()) -> dict[int, Path]:
    """{job number: dir} of the sweep, plus the jobs in `also` (the journal's, which may have
    no dir yet); a UserError that says where to look when there are none."""
    if not sweep.is_dir():
        raise UserError(f"{sweep}: no such directory (expected a Hydra multirun dir)")
    known = set(also)
    jobs = {
        int(p.name): p
        for p in sweep.iterdir()
        if p.name.isdigit() and (int(p.name) in known or (p.is_dir() and _looks_like_job(p)))
    }
    jobs |= {num: Path(job_dir(sweep, num)) for num in also if num not in jobs}
    if jobs:
        return dict(sorted(jobs.items()))
    message = f"{sweep} is not a sweep dir: no job subdirectories 0/, 1/, ... with Hydra output"
    if sweep.name.isdigit() and _looks_like_job(sweep):
        message += f"; this looks like one job of a sweep, try its parent {sweep.parent}"
    else:
        # People often pass `.../multirun` instead of `.../multirun/<time>`.
        found = sorted(
            {p.parent for p in sweep.glob("*/*") if p.name.isdigit() and _looks_like_job(p)}
        )
        if found:
            message += "; sweeps below it: " + ", ".join(str(p) for p in found[-5:])
    raise UserError(message)


def _looks_like_job(d: Path) -> bool:
    names = (".hydra/overrides.yaml", "metrics.jsonl", "status.json", "config.yaml")
    return any((d / name).exists() for name in names)


def read_overrides(job_dir: Path) -> dict[str, str]:
    """The job's overrides as {key: value}, in order; `+`/`++`/`~` prefixes dropped."""
    data = _read_yaml(job_dir / ".hydra" / "overrides.yaml")
    return overrides_dict(data if isinstance(data, list) else [])


def overrides_dict(items: list) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def swept_keys(job_overrides: list[dict[str, str]], declared: set[str]) -> list[str]:
    """Override keys whose value differs across jobs or that were given with sweep syntax.

    Constant overrides (`experiment=debug`, `name=lr_sweep`) describe the whole sweep, not a
    row, so they stay out of the table.
    """
    keys = dict.fromkeys(key for ovr in job_overrides for key in ovr)
    swept = []
    for key in keys:
        if key in NOT_PARAMS or key.startswith(("hydra.", "hydra/")):
            continue
        if len({ovr.get(key) for ovr in job_overrides}) > 1 or key in declared:
            swept.append(key)
    return swept


def declared_sweep_keys(sweep: Path, hydra_cfg: dict) -> set[str]:
    """Keys given with sweep syntax (`a=1,2`, `range(...)`, `tag(log,interval(...))`).

    They count as swept even while only one job has started. The command line is in
    multirun.yaml (basic sweeper); `hydra.sweeper.params` holds sweeps given in config.
    """
    candidates = list(_get(hydra_cfg, "overrides.task") or [])
    params = _get(hydra_cfg, "sweeper.params") or {}
    if isinstance(params, dict):
        candidates += [f"{k}={v}" for k, v in params.items()]
    declared = set()
    for text in candidates:
        key = _sweep_key(str(text))
        if key:
            declared.add(key)
    return declared


def _sweep_key(override: str) -> str | None:
    """The key of a sweep override, via Hydra's own override grammar; None otherwise."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(override)
    except Exception:  # noqa: BLE001 - an unparsable override simply is not a sweep here
        return None
    return parsed.key_or_group if parsed.is_sweep_override() else None


def sweep_hydra_config(sweep: Path, job_dirs: dict[int, Path]) -> dict:
    """The `hydra` node of the sweep: multirun.yaml, else the first job's .hydra/hydra.yaml."""
    data = _read_yaml(sweep / "multirun.yaml")
    if not isinstance(data, dict):
        for d in job_dirs.values():
            data = _read_yaml(d / ".hydra" / "hydra.yaml")
            if isinstance(data, dict):
                break
    hydra_cfg = data.get("hydra") if isinstance(data, dict) else None
    return hydra_cfg if isinstance(hydra_cfg, dict) else {}


def read_metrics(path: Path) -> dict[int, dict[str, Any]]:
    """{step: record}, steps ascending; a resumed run repeats steps, so later values win."""
    return by_step(metrics_lib.read_metrics(path))


def by_step(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    merged: dict[int, dict[str, Any]] = {}
    for record in records:
        merged.setdefault(record["step"], {}).update(record)
    return dict(sorted(merged.items()))


def read_optuna(sweep_dir: str | Path) -> dict | None:
    """optimization_results.yaml (`name`, `best_params`, `best_value`) or None."""
    data = _read_yaml(Path(sweep_dir) / "optimization_results.yaml")
    return data if isinstance(data, dict) else None


def _job_result(
    num: int,
    job_dir: Path,
    overrides: dict[str, str],
    swept: list[str],
    *,
    optuna: bool,
    job: JobEntry | None = None,
) -> JobResult:
    cfg = _read_yaml(job_dir / "config.yaml")
    if not isinstance(cfg, dict):  # crashed before training wrote it: Hydra's composed config
        cfg = _read_yaml(job_dir / ".hydra" / "config.yaml")
    cfg = cfg if isinstance(cfg, dict) else {}
    status = _read_json(job_dir / "status.json")
    records = metrics_lib.read_metrics(job_dir / "metrics.jsonl")
    metrics = by_step(records)
    result = (job.result if job else None) or {}
    if result.get("status") == "PRUNED" and is_number(result.get("step")):
        # What it logged between the pruner's verdict and the cancel is not part of the trial.
        metrics = {s: m for s, m in metrics.items() if s <= result["step"]}

    def last(key: str) -> float | None:
        values = [r[key] for r in metrics.values() if is_number(r.get(key))]
        return float(values[-1]) if values else None

    vals = [float(r["loss/val"]) for r in metrics.values() if is_number(r.get("loss/val"))]
    finite_vals = [v for v in vals if math.isfinite(v)]
    step = max(metrics) if metrics else None
    if is_number(result.get("step")):  # a pruned trial: where it was stopped
        step = int(result["step"])
    steps = _int(_get(cfg, "steps"))

    state = str(status.get("status") or "").upper()
    if job is not None:  # the journal knows the final word (status.json may say PREEMPTED)
        if job.final or job.state == "RUNNING":
            state = job.state
        elif state != "PREEMPTED":
            state = "PENDING"
    elif not state:  # no status.json (another launcher): infer from how far the metrics got
        if step is not None and steps is not None and step >= steps:
            state = "COMPLETED"
        else:
            state = "RUNNING" if metrics else "UNKNOWN"
    if state not in STATUSES:
        state = "UNKNOWN"

    cluster = str(
        (job.cluster if job else None) or status.get("cluster") or _get(cfg, "cluster.name")
        or overrides.get("cluster") or ""
    )  # fmt: skip
    wandb_run = ""
    if _wandb_ran(cfg, job_dir):
        job_id = (job.job_id if job else None) or status.get("job_id") or _hydra_job_id(job_dir)
        wandb_run = f"{_get(cfg, 'name')}_{cluster}_{job_id}" if job_id else ""

    objective = None
    if optuna:
        # The task function returns the final val loss; without status.json that is the best
        # stand-in for what Optuna was told.
        objective = _float(result.get("value")) if is_number(result.get("value")) else None
        objective = objective if objective is not None else _float(status.get("return_value"))
        if objective is None and state == "COMPLETED":
            objective = vals[-1] if vals else None
    error = None
    if state in WITH_ERROR:
        error = error_line(result.get("error")) or error_line(
            status.get("error"), status.get("traceback")
        )
    trial = job.trial if job is not None and job.trial is not None else None

    return JobResult(
        job=num,
        dir=job_dir,
        params={key: overrides.get(key, "") for key in swept},
        cluster=cluster,
        status=state,
        error=error,
        step=step,
        steps=steps,
        final_val=vals[-1] if vals else None,
        best_val=min(finite_vals) if finite_vals else None,
        tokens_per_s=last("tokens_per_s"),
        wall_s=_wall(job, status, records),
        wandb_run=wandb_run,
        lr=_float(_get(cfg, "optim.lr")) or _float(overrides.get("optim.lr")),
        scheduler=_get(cfg, "optim.scheduler") or overrides.get("optim.scheduler"),
        trial=trial if trial is not None else (num if optuna else None),
        objective=objective,
        data=str(_read_json(job_dir / metrics_lib.DATA_FILE).get("fingerprint") or ""),
    )


def error_line(error: Any, traceback: Any = None) -> str | None:
    """The line that says what went wrong: the exception line of a traceback, also one wrapped
    by submitit ("FailedJobError: Job (task=0) failed during processing with trace: ...")."""
    for text in (error, traceback):
        if not isinstance(text, str) or not text.strip():
            continue
        if SUBMITIT_WRAPPER in text:
            parts = text.split("----------------------")
            text = parts[1] if len(parts) > 2 else text.split(SUBMITIT_WRAPPER, 1)[1]
        lines = [line for line in text.strip().splitlines() if line.strip()]
        if "Traceback (most recent call last)" not in text:
            lines = lines[:1]  # a message, not a traceback: its first line
        for line in reversed(lines):
            if not line.startswith((" ", "\t", "Traceback", "During handling", "The above")):
                if line.strip().lstrip(":").strip():
                    return line.strip()
                break  # nothing but the wrapper's own line: try the traceback
    return None


def _wall(job: JobEntry | None, status: dict, records: list[dict]) -> float | None:
    """Seconds on a node, over every allocation of a requeued job.

    The journal's RUNNING spans count when it saw more than one; otherwise status.json (the
    last allocation, timed by the job itself) plus the earlier allocations that metrics.jsonl
    shows (a resumed run starts again at a step at or below where the last one stopped).
    """
    spans = _running_spans(job) if job is not None else []
    if len(spans) > 1:
        return sum(end - start for start, end in spans)
    allocations: list[list[float]] = []
    previous = None
    for r in records:
        if not is_number(r.get("time")):
            continue
        if previous is None or r["step"] < previous:
            allocations.append([])
        allocations[-1].append(float(r["time"]))
        previous = r["step"]
    earlier = sum(max(a) - min(a) for a in allocations[:-1])
    start, end = _float(status.get("started")), _float(status.get("finished"))
    if start is not None and end is not None and end >= start:
        return earlier + end - start
    if spans:
        return spans[0][1] - spans[0][0]
    if allocations:
        return earlier + max(allocations[-1]) - min(allocations[-1])
    return None


def _running_spans(job: JobEntry) -> list[tuple[float, float]]:
    spans, since = [], None
    for t, state, _ in job.history:
        if state == "RUNNING" and since is None:
            since = t
        elif state != "RUNNING" and since is not None:
            spans.append((since, t))
            since = None
    if since is not None:
        spans.append((since, job.ended_at or time.time()))
    return spans


def _wandb_ran(cfg: dict, job_dir: Path) -> bool:
    """WandB configured is not WandB run: a job that failed first has no run to link to."""
    wandb_cfg = _get(cfg, "logging.wandb")
    if not isinstance(wandb_cfg, dict) or wandb_cfg.get("mode") == "disabled":
        return False
    base = Path(str(wandb_cfg.get("dir") or job_dir))
    base = base if base.is_absolute() else job_dir / base
    return any((base / "wandb").glob("*run-*"))


def _hydra_job_id(job_dir: Path) -> str | None:
    """The Slurm job id Hydra recorded (submitit sets it); the basic launcher's is a placeholder."""
    job_id = _get(_read_yaml(job_dir / ".hydra" / "hydra.yaml") or {}, "hydra.job.id")
    if not job_id or str(job_id).startswith("job_id_for_") or str(job_id) == "???":
        return None
    return str(job_id)


# --- small helpers ---------------------------------------------------------------------------


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=SAFE_LOADER)
    except yaml.YAMLError:
        return None  # a half-copied file must not hide the other jobs


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def fmt_loss(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
