"""`lingua-sweep results`: the table of a sweep, read from its Hydra multirun directory.

Only files are read (no Slurm, no WandB), so it works mid-sweep, after the fact and on a copy.
Per job `<sweep dir>/<n>/`:
  .hydra/overrides.yaml   the job's overrides (which parameters were swept, and their values)
  config.yaml             the resolved TrainConfig; else Hydra's composed `.hydra/config.yaml`
  metrics.jsonl           one JSON object per line, each with `step`
  status.json             written by the multicluster launcher's job wrapper (may be absent)
Optuna sweeps also write `<sweep dir>/optimization_results.yaml` at the end.

    rows = collect("outputs/lr_sweep/multirun/2025-01-01_12-00-00")
    print_table(rows); to_markdown(rows); to_csv(rows); plot(rows, sweep_dir, "sweep.png")
"""

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lingua_sweep.errors import UserError

STATUSES = ("COMPLETED", "FAILED", "RUNNING", "PREEMPTED", "UNKNOWN")
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
    error: str | None = None  # first line of the error, for FAILED/PREEMPTED
    step: int | None = None  # last step logged
    steps: int | None = None  # total steps configured
    final_val: float | None = None  # loss/val at the last step that has one
    best_val: float | None = None  # lowest loss/val seen
    tokens_per_s: float | None = None  # at the last step that has it
    wall_s: float | None = None
    wandb_run: str = ""  # `{name}_{cluster}_{job_id}`; empty when WandB was not configured
    lr: float | None = None  # optim.lr and optim.scheduler, for the plot
    scheduler: str | None = None
    trial: int | None = None  # Optuna only
    objective: float | None = None  # Optuna only: the value the trial returned
    best: bool = False


# --- reading ---------------------------------------------------------------------------------


def collect(sweep_dir: str | Path) -> list[JobResult]:
    """One row per job, sorted by final validation loss (missing last), the best one marked.

    The best row is the lowest final val loss among COMPLETED jobs; while none has completed,
    the lowest among all, so a sweep in progress still shows its leader.
    """
    sweep = Path(sweep_dir)
    job_dirs = find_job_dirs(sweep)
    hydra_cfg = _sweep_hydra_config(sweep, job_dirs)
    overrides = {num: read_overrides(d) for num, d in job_dirs.items()}
    swept = swept_keys(list(overrides.values()), declared_sweep_keys(sweep, hydra_cfg))
    # optimization_results.yaml only appears when the study ends; the sweeper config is there
    # from the first trial.
    sweeper = str(_get(hydra_cfg, "sweeper._target_") or "")
    optuna = "optuna" in sweeper or (sweep / "optimization_results.yaml").exists()
    rows = [
        _job_result(num, d, overrides[num], swept, optuna=optuna) for num, d in job_dirs.items()
    ]
    rows.sort(key=lambda r: (not _finite(r.final_val), r.final_val or 0.0, r.job))
    completed = [r for r in rows if r.status == "COMPLETED" and _finite(r.final_val)]
    candidates = completed or [r for r in rows if _finite(r.final_val)]
    if candidates:
        candidates[0].best = True  # rows are sorted, so the first candidate is the lowest
    return rows


def find_job_dirs(sweep: Path) -> dict[int, Path]:
    """{job number: dir} of the sweep; a UserError that says where to look when there are none."""
    if not sweep.is_dir():
        raise UserError(f"{sweep}: no such directory (expected a Hydra multirun dir)")
    jobs = {
        int(p.name): p
        for p in sweep.iterdir()
        if p.is_dir() and p.name.isdigit() and _looks_like_job(p)
    }
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
    out: dict[str, str] = {}
    for item in data if isinstance(data, list) else []:
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
    if not path.exists():
        return merged
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # e.g. the line a running job is writing right now
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            merged.setdefault(step, {}).update(record)
    return dict(sorted(merged.items()))


def read_optuna(sweep_dir: str | Path) -> dict | None:
    """optimization_results.yaml (`name`, `best_params`, `best_value`) or None."""
    data = _read_yaml(Path(sweep_dir) / "optimization_results.yaml")
    return data if isinstance(data, dict) else None


def _job_result(
    num: int, job_dir: Path, overrides: dict[str, str], swept: list[str], *, optuna: bool
) -> JobResult:
    cfg = _read_yaml(job_dir / "config.yaml")
    if not isinstance(cfg, dict):  # crashed before training wrote it: Hydra's composed config
        cfg = _read_yaml(job_dir / ".hydra" / "config.yaml")
    cfg = cfg if isinstance(cfg, dict) else {}
    status = _read_json(job_dir / "status.json")
    metrics = read_metrics(job_dir / "metrics.jsonl")

    def last(key: str) -> float | None:
        values = [r[key] for r in metrics.values() if _number(r.get(key))]
        return float(values[-1]) if values else None

    vals = [float(r["loss/val"]) for r in metrics.values() if _number(r.get("loss/val"))]
    finite_vals = [v for v in vals if math.isfinite(v)]
    step = max(metrics) if metrics else None
    steps = _int(_get(cfg, "steps"))

    state = str(status.get("status") or "").upper()
    if not state:  # no status.json (another launcher): infer from how far the metrics got
        if step is not None and steps is not None and step >= steps:
            state = "COMPLETED"
        else:
            state = "RUNNING" if metrics else "UNKNOWN"
    elif state not in STATUSES:
        state = "UNKNOWN"

    times = [float(r["time"]) for r in metrics.values() if _number(r.get("time"))]
    start = _float(status.get("started")) or (min(times) if times else None)
    end = _float(status.get("finished")) or (max(times) if times else None)
    wall = end - start if start is not None and end is not None and end >= start else None

    cluster = str(
        status.get("cluster") or _get(cfg, "cluster.name") or overrides.get("cluster") or ""
    )
    wandb_run = ""
    wandb_cfg = _get(cfg, "logging.wandb")
    if isinstance(wandb_cfg, dict) and wandb_cfg.get("mode") != "disabled":
        job_id = status.get("job_id") or _hydra_job_id(job_dir)
        wandb_run = f"{_get(cfg, 'name')}_{cluster}_{job_id}" if job_id else ""

    objective = None
    if optuna:
        # The task function returns the final val loss; without status.json that is the best
        # stand-in for what Optuna was told.
        objective = _float(status.get("return_value"))
        if objective is None and state == "COMPLETED":
            objective = vals[-1] if vals else None

    return JobResult(
        job=num,
        dir=job_dir,
        params={key: overrides.get(key, "") for key in swept},
        cluster=cluster,
        status=state,
        error=(status.get("error") or None) if state in ("FAILED", "PREEMPTED") else None,
        step=step,
        steps=steps,
        final_val=vals[-1] if vals else None,
        best_val=min(finite_vals) if finite_vals else None,
        tokens_per_s=last("tokens_per_s"),
        wall_s=wall,
        wandb_run=wandb_run,
        lr=_float(_get(cfg, "optim.lr")) or _float(overrides.get("optim.lr")),
        scheduler=_get(cfg, "optim.scheduler") or overrides.get("optim.scheduler"),
        trial=num if optuna else None,
        objective=objective,
    )


def _hydra_job_id(job_dir: Path) -> str | None:
    """The Slurm job id Hydra recorded (submitit sets it); the basic launcher's is a placeholder."""
    job_id = _get(_read_yaml(job_dir / ".hydra" / "hydra.yaml") or {}, "hydra.job.id")
    if not job_id or str(job_id).startswith("job_id_for_") or str(job_id) == "???":
        return None
    return str(job_id)


# --- rendering -------------------------------------------------------------------------------


def status_text(row: JobResult) -> str:
    return f"{row.status}: {row.error}" if row.error else row.status


def _display_columns(rows: list[JobResult]) -> list[tuple[str, Callable[[JobResult], str]]]:
    """(header, cell text) pairs shared by the terminal table and markdown."""
    columns: list[tuple[str, Callable[[JobResult], str]]] = [
        ("best", lambda r: "★" if r.best else ""),
        ("job", lambda r: str(r.job)),
    ]
    if any(r.trial is not None for r in rows):
        columns += [
            ("trial", lambda r: "" if r.trial is None else str(r.trial)),
            ("objective", lambda r: _fmt_loss(r.objective)),
        ]
    for key in rows[0].params if rows else []:
        columns.append((key, lambda r, key=key: r.params.get(key, "")))
    columns += [
        ("cluster", lambda r: r.cluster),
        ("status", status_text),
        ("steps", lambda r: f"{'-' if r.step is None else r.step}/{r.steps or '?'}"),
        ("final val", lambda r: _fmt_loss(r.final_val)),
        ("best val", lambda r: _fmt_loss(r.best_val)),
        ("tok/s", lambda r: "" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"),
        ("wall", lambda r: _fmt_duration(r.wall_s)),
    ]
    if any(r.wandb_run for r in rows):  # an always-empty column only costs width
        columns.append(("wandb run", lambda r: r.wandb_run))
    return columns


STATUS_STYLES = {
    "COMPLETED": "green",
    "FAILED": "red",
    "RUNNING": "yellow",
    "PREEMPTED": "magenta",
    "UNKNOWN": "dim",
}


def print_table(rows: list[JobResult], *, console=None, title: str | None = None) -> None:
    """The rich table on the terminal (or on `console`, e.g. one writing to a file)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    columns = _display_columns(rows)
    for header, _ in columns:
        numeric = header in ("job", "trial", "objective", "final val", "best val", "tok/s", "wall")
        table.add_column(header, justify="right" if numeric else "left")
    for row in rows:
        # Text objects, not markup strings: a value like `[1,2]` must print as it is.
        cells = [Text(cell(row)) for _, cell in columns]
        cells[[h for h, _ in columns].index("status")].stylize(STATUS_STYLES.get(row.status, ""))
        table.add_row(*cells, style="bold" if row.best else None)
    (console or Console()).print(table)


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
    data = read_optuna(sweep_dir)
    if not data or "best_value" not in data:
        return None
    params = ", ".join(f"{k}={v}" for k, v in (data.get("best_params") or {}).items())
    return f"optuna best value {data['best_value']} at {params}"


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
        label = ", ".join(f"{short[k]}={v}" for k, v in r.params.items()) or f"job {r.job}"
        if r.status != "COMPLETED":
            label += f" ({r.status.lower()})"
        for key, style in (("loss/out", "-"), ("loss/val", "--")):
            points = [(step, m[key]) for step, m in metrics.items() if _finite(m.get(key))]
            if not points:
                continue
            ax.plot(*zip(*points, strict=True), ls=style, lw=2.2 if r.best else 1.0,
                    color=f"C{i % 10}", marker="." if key == "loss/val" else None,
                    label=label)  # fmt: skip
            label = None  # one legend entry per run
            drawn = True
    if drawn:
        # Curves start near ln(vocab) ~ 11 and end near 3: a log axis keeps the end readable;
        # plain numbers on it, not 6x10^0.
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.legend(fontsize="small", title="solid loss/out, dashed loss/val")
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
