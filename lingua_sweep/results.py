"""`lingua-sweep results`: the table of a sweep, read from its Hydra multirun directory.

Only files are read (no Slurm, no WandB), so it works mid-sweep, after the fact and on a copy.
Per job `<sweep dir>/<n>/`:
  .hydra/overrides.yaml   the job's overrides (which parameters were swept, and their values)
  config.yaml             the resolved TrainConfig; else Hydra's composed `.hydra/config.yaml`
  metrics.jsonl           one JSON object per line, each with `step`
  status.json             written by the multicluster launcher's job wrapper (may be absent)
Optuna sweeps also write `<sweep dir>/optimization_results.yaml` at the end. A multicluster sweep
has `<sweep dir>/journal.jsonl`: where it exists, it is the truth on each job's final state
(PRUNED, CANCELLED), its trial number, the step it stopped at and its time on a node.

    rows = collect("outputs/lr_sweep/multirun/2025-01-01_12-00-00")
    print_table(rows); to_markdown(rows); to_csv(rows); plot(rows, sweep_dir, "sweep.png")
"""

import csv
import io
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lingua_sweep.errors import UserError
from lingua_sweep.sweep.journal import JobEntry, Journal, SweepState

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
    hydra_cfg = _sweep_hydra_config(sweep, job_dirs)
    overrides = {
        num: read_overrides(d) or _overrides_dict(jobs[num].overrides if num in jobs else [])
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
    maximize = _maximize(journal, hydra_cfg)
    for r in rows:
        r.maximize = maximize
    rows.sort(key=lambda r: (not _finite(r.final_val), r.final_val or 0.0, r.job))
    for statuses in BEST_CANDIDATES:
        candidates = [r for r in rows if r.status in statuses and _finite(r.final_val)]
        if not candidates:
            continue
        by_objective = [r for r in candidates if _finite(r.objective)]
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


def _maximize(journal: SweepState | None, hydra_cfg: dict) -> bool:
    directions = ((journal.header.get("study") or {}).get("directions") if journal else None) or [
        _get(hydra_cfg, "sweeper.direction")
    ]
    return str(directions[0]).lower().endswith("maximize")


def find_job_dirs(sweep: Path, also: Iterable[int] = ()) -> dict[int, Path]:
    """{job number: dir} of the sweep, plus the jobs in `also` (the journal's, which may have
    no dir yet); a UserError that says where to look when there are none."""
    if not sweep.is_dir():
        raise UserError(f"{sweep}: no such directory (expected a Hydra multirun dir)")
    jobs = {
        int(p.name): p
        for p in sweep.iterdir()
        if p.is_dir() and p.name.isdigit() and _looks_like_job(p)
    }
    jobs |= {num: sweep / str(num) for num in also if num not in jobs}
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
    return _overrides_dict(data if isinstance(data, list) else [])


def _overrides_dict(items: list) -> dict[str, str]:
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


def _sweep_hydra_config(sweep: Path, job_dirs: dict[int, Path]) -> dict:
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
    merged: dict[int, dict[str, Any]] = {}
    for record in read_records(path):
        merged.setdefault(record["step"], {}).update(record)
    return dict(sorted(merged.items()))


def read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records in file order; torn and invalid lines skipped (the line a running
    job is writing now, a crash mid-write, NUL padding, a record without an integer `step`)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if type(step) is int and step >= 0:
            out.append(record)
    return out


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
    records = read_records(job_dir / "metrics.jsonl")
    metrics = read_metrics(job_dir / "metrics.jsonl")
    result = (job.result if job else None) or {}
    if result.get("status") == "PRUNED" and _number(result.get("step")):
        # What it logged between the pruner's verdict and the cancel is not part of the trial.
        metrics = {s: m for s, m in metrics.items() if s <= result["step"]}

    def last(key: str) -> float | None:
        values = [r[key] for r in metrics.values() if _number(r.get(key))]
        return float(values[-1]) if values else None

    vals = [float(r["loss/val"]) for r in metrics.values() if _number(r.get("loss/val"))]
    finite_vals = [v for v in vals if math.isfinite(v)]
    step = max(metrics) if metrics else None
    if _number(result.get("step")):  # a pruned trial: where it was stopped
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
        objective = _float(result.get("value")) if _number(result.get("value")) else None
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
        if not _number(r.get("time")):
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


# --- rendering -------------------------------------------------------------------------------


def status_text(row: JobResult) -> str:
    return f"{row.status}: {row.error}" if row.error else row.status


Column = tuple[str, Callable[[JobResult], str]]
# Dropped in this order (first = least useful) when the terminal is too narrow for the table:
# never the status, the error, the steps or the losses a sweep is read for.
DROP_FIRST = ("wandb run", "tok/s", "best val", "objective", "wall", "cluster")
NUMERIC = ("job", "trial", "objective", "final val", "best val", "tok/s", "wall")
WRAPPING = ("error",)  # the only columns that may wrap; swept params are short once formatted
WRAP_MIN = 16


def _display_columns(rows: list[JobResult], *, split_error: bool = False) -> list[Column]:
    """(header, cell text) pairs shared by the terminal table (with the error in a column of
    its own, which may wrap) and markdown (status and error in one cell)."""
    columns: list[Column] = [
        ("best", lambda r: "★" if r.best else ""),
        ("job", lambda r: str(r.job)),
    ]
    if any(r.trial is not None for r in rows):
        columns += [
            ("trial", lambda r: "" if r.trial is None else str(r.trial)),
            ("objective", lambda r: _fmt_loss(r.objective)),
        ]
    for key in rows[0].params if rows else []:
        columns.append((key, lambda r, key=key: fmt_param(r.params.get(key, ""))))
    columns += [
        ("cluster", lambda r: r.cluster),
        ("status", (lambda r: r.status) if split_error else status_text),
        ("steps", lambda r: f"{'-' if r.step is None else r.step}/{r.steps or '?'}"),
        ("final val", lambda r: _fmt_loss(r.final_val)),
        ("best val", lambda r: _fmt_loss(r.best_val)),
        ("tok/s", lambda r: "" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"),
        ("wall", lambda r: _fmt_duration(r.wall_s)),
    ]
    if split_error and any(r.error for r in rows):
        columns.append(("error", lambda r: r.error or ""))
    if any(r.wandb_run for r in rows):  # an always-empty column only costs width
        columns.append(("wandb run", lambda r: r.wandb_run))
    return columns


def fmt_param(value: str) -> str:
    """A swept value as people read it: floats to 3 significant digits (Optuna's samples have
    17), everything else (ints, names, lists) as given."""
    try:
        number = float(value)
    except ValueError:
        return value
    if value.strip().lstrip("+-").isdigit() or not math.isfinite(number):
        return value
    return f"{number:.3g}"


STATUS_STYLES = {
    "COMPLETED": "green",
    "FAILED": "red",
    "PRUNED": "magenta",
    "CANCELLED": "yellow",
    "RUNNING": "cyan",
    "PREEMPTED": "magenta",
    "PENDING": "dim",
    "UNKNOWN": "dim",
}


def print_table(rows: list[JobResult], *, console=None, title: str | None = None) -> None:
    """The rich table on the terminal (or on `console`, e.g. one writing to a file), fitted to
    its width: low-value columns go first, the error wraps, status and losses stay whole."""
    from rich.console import Console

    console = console or Console()
    columns = _display_columns(rows, split_error=True)
    for drop in DROP_FIRST:
        if _table_width(rows, columns) <= console.width:
            break
        columns = [c for c in columns if c[0] != drop]
    console.print(_rich_table(rows, columns, title))


def _table_width(rows: list[JobResult], columns: list[Column]) -> int:
    """The narrowest width at which rich lays the table out without cutting a cell: every
    column at its widest, except those that wrap (at `WRAP_MIN`); 3 between columns, 2 edges."""
    from rich.cells import cell_len

    total = 3 * (len(columns) - 1) + 2
    for header, cell in columns:
        widest = max([cell_len(header), *(cell_len(cell(r)) for r in rows)])
        total += min(widest, WRAP_MIN) if header in WRAPPING else widest
    return total


def _rich_table(rows: list[JobResult], columns: list[Column], title: str | None):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for header, _ in columns:
        wraps = header in WRAPPING
        table.add_column(header, justify="right" if header in NUMERIC else "left",
                         no_wrap=not wraps, overflow="fold" if wraps else "ellipsis")  # fmt: skip
    headers = [h for h, _ in columns]
    for row in rows:
        # Text objects, not markup strings: a value like `[1,2]` must print as it is.
        cells = [Text(cell(row)) for _, cell in columns]
        cells[headers.index("status")].stylize(STATUS_STYLES.get(row.status, ""))
        table.add_row(*cells, style="bold" if row.best else None)
    return table


def table_text(rows: list[JobResult], *, title: str | None = None, width: int = 200) -> str:
    """The terminal table as plain text, for `--output FILE`."""
    from rich.console import Console

    buffer = io.StringIO()
    print_table(rows, console=Console(file=buffer, width=width, color_system=None), title=title)
    # rich pads every line to the console width; a file wants no trailing blanks.
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()).strip("\n") + "\n"


def to_markdown(rows: list[JobResult]) -> str:
    columns = _display_columns(rows)

    def line(cells: list[str]) -> str:
        # A `|` inside a cell (an error message) would split it into two columns.
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    lines = [line([h for h, _ in columns]), line(["---"] * len(columns))]
    lines += [line([cell(r) for _, cell in columns]) for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[JobResult]) -> str:
    """Raw values (seconds, full floats, separate error column), for scripts and spreadsheets."""
    optuna = any(r.trial is not None for r in rows)
    params = list(rows[0].params) if rows else []
    header = ["job", *(["trial", "objective"] if optuna else []), *params]
    header += ["cluster", "status", "error", "step", "steps", "final_val_loss", "best_val_loss"]
    header += ["tokens_per_s", "wall_s", "wandb_run", "best"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        record = [r.job, *([r.trial, r.objective] if optuna else [])]
        record += [r.params.get(key, "") for key in params]
        record += [r.cluster, r.status, r.error, r.step, r.steps, r.final_val, r.best_val]
        record += [r.tokens_per_s, None if r.wall_s is None else round(r.wall_s, 1)]
        record += [r.wandb_run, "true" if r.best else "false"]
        writer.writerow(["" if v is None else v for v in record])
    return buffer.getvalue()


def optuna_summary(sweep_dir: str | Path) -> str | None:
    """The study's best: optimization_results.yaml once the study has ended, else the best
    trial so far from the journal (async_optuna), with the trials' states."""
    data = read_optuna(sweep_dir) or {}
    states = data.get("states") if isinstance(data.get("states"), dict) else None
    best = None
    if "best_value" in data:
        best = (data["best_value"], data.get("best_params") or {}, data.get("best_trial"))
    journal = read_journal(Path(sweep_dir))
    if journal is not None and (journal.header.get("study") or best is None):
        trials = [j for j in journal.jobs.values() if j.trial is not None]
        if trials and states is None:
            states = {}
            for j in trials:
                states[j.state] = states.get(j.state, 0) + 1
        if best is None:
            done = [j for j in trials if j.state == "COMPLETED"
                    and _finite((j.result or {}).get("value"))]  # fmt: skip
            if done:
                pick = max if _maximize(journal, {}) else min
                j = pick(done, key=lambda j: j.result["value"])
                # The searched params: declared as sweeps, or varying across the trials.
                sweep = Path(sweep_dir)
                all_overrides = [_overrides_dict(t.overrides) for t in trials]
                keys = swept_keys(
                    all_overrides, declared_sweep_keys(sweep, _sweep_hydra_config(sweep, {}))
                )
                params = _overrides_dict(j.overrides)
                best = (j.result["value"], {k: params[k] for k in keys if k in params}, j.trial)
    if best is None:
        return None
    value, params, trial = best
    params_text = ", ".join(f"{k}={fmt_param(str(v))}" for k, v in params.items())
    text = f"optuna best value {_fmt_value(value)} at {params_text}"
    text += f" (trial {trial})" if trial is not None else ""
    if states:
        counts = ", ".join(f"{n} {s.lower()}" for s, n in states.items() if n)
        text += f"; {sum(states.values())} trials: {counts}"
    return text


def _fmt_value(value: Any) -> str:
    return f"{value:.4g}" if _number(value) else str(value)


# --- plot ------------------------------------------------------------------------------------


def plot(rows: list[JobResult], sweep_dir: str | Path, out_png: str | Path) -> Path:
    """Two panels: final val loss vs learning rate (one line per scheduler), and the curves."""
    # The Agg canvas directly, not pyplot: no global backend state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_lr, ax_curves = fig.subplots(1, 2)
    _plot_lr(ax_lr, rows)
    _plot_curves(ax_curves, rows, Path(sweep_dir))
    out = Path(out_png)
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise UserError(f"cannot write plot {out}: {e.strerror or e}") from e
    return out


def _plot_lr(ax, rows: list[JobResult]) -> None:
    """Completed runs as a line per scheduler; unfinished runs as hollow markers, unjoined,
    since their last val loss is not comparable with a finished one."""
    schedulers = sorted({r.scheduler or "?" for r in rows if r.lr and r.lr > 0})
    drawn = False
    for i, scheduler in enumerate(schedulers):
        mine = sorted(
            (r.lr, r.final_val, r.status == "COMPLETED")
            for r in rows
            if (r.scheduler or "?") == scheduler and r.lr and r.lr > 0 and _finite(r.final_val)
        )
        done = [(lr, val) for lr, val, completed in mine if completed]
        open_ = [(lr, val) for lr, val, completed in mine if not completed]
        color = f"C{i % 10}"
        if done:
            ax.plot(*zip(*done, strict=True), marker="o", color=color, label=scheduler)
        if open_:
            label = None if done else scheduler
            ax.plot(*zip(*open_, strict=True), marker="o", mfc="none", ls="none", color=color,
                    label=label)  # fmt: skip
        drawn = drawn or bool(mine)
    best = next((r for r in rows if r.best and r.lr and r.lr > 0), None)
    if best is not None:
        ax.plot([best.lr], [best.final_val], marker="*", ms=16, color="gold", mec="black",
                ls="none", label=f"best (job {best.job})")  # fmt: skip
    if drawn:
        ax.set_xscale("log")
        ax.legend(title="scheduler (hollow: not completed)", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no val loss with a learning rate yet", ha="center",
                transform=ax.transAxes)  # fmt: skip
    ax.set(xlabel="learning rate (optim.lr)", ylabel="final loss/val",
           title="final validation loss vs learning rate")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)


def _plot_curves(ax, rows: list[JobResult], sweep_dir: Path) -> None:
    from matplotlib.ticker import LogFormatter

    # Legend labels by the last part of each swept key (`lr=0.003`) when that is unambiguous.
    keys = list(rows[0].params) if rows else []
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(keys):
        short = {k: k for k in keys}
    drawn = False
    for i, r in enumerate(rows):
        metrics = read_metrics(sweep_dir / str(r.job) / "metrics.jsonl")
        label = ", ".join(f"{short[k]}={fmt_param(v)}" for k, v in r.params.items())
        label = label or f"job {r.job}"
        pruned = r.status == "PRUNED"
        if pruned:
            label += f" (pruned at {r.step})"
        elif r.status != "COMPLETED":
            label += f" ({r.status.lower()})"
        for key, style in (("loss/out", "-"), ("loss/val", "--")):
            points = [(step, m[key]) for step, m in metrics.items() if _finite(m.get(key))
                      and not (pruned and r.step is not None and step > r.step)]  # fmt: skip
            if not points:
                continue
            ax.plot(*zip(*points, strict=True), ls=style, lw=2.2 if r.best else 1.0,
                    color=f"C{i % 10}", marker="." if key == "loss/val" else None,
                    alpha=0.5 if pruned else 1.0, label=label)  # fmt: skip
            if pruned:  # a cross where the pruner stopped it
                ax.plot(*points[-1], marker="x", ms=9, mew=2, color=f"C{i % 10}", ls="none")
            label = None  # one legend entry per run
            drawn = True
    if drawn:
        # Curves start near ln(vocab) ~ 11 and end near 3: a log axis keeps the end readable;
        # plain numbers on it, not 6x10^0.
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.legend(fontsize="small", title="solid loss/out, dashed loss/val, x pruned")
    else:
        ax.text(0.5, 0.5, "no losses yet", ha="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="loss", title="training and validation loss")
    ax.grid(True, which="both", alpha=0.3)


# --- small helpers ---------------------------------------------------------------------------


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
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


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


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


def _fmt_loss(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
