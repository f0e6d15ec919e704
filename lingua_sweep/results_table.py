"""`lingua-sweep results` as text: a terminal table that fits, Markdown, CSV, the study's line.

Reads nothing itself: rows come from `lingua_sweep.results.collect`.
"""

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lingua_sweep.results import (
    JobResult,
    declared_sweep_keys,
    finite,
    fmt_duration,
    fmt_loss,
    is_number,
    overrides_dict,
    read_journal,
    read_optuna,
    sweep_hydra_config,
    swept_keys,
    wants_max,
)

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
            ("objective", lambda r: fmt_loss(r.objective)),
        ]
    for key in rows[0].params if rows else []:
        columns.append((key, lambda r, key=key: fmt_param(r.params.get(key, ""))))
    columns += [
        ("cluster", lambda r: r.cluster),
        ("status", (lambda r: r.status) if split_error else status_text),
        ("steps", lambda r: f"{'-' if r.step is None else r.step}/{r.steps or '?'}"),
        ("final val", lambda r: fmt_loss(r.final_val)),
        ("best val", lambda r: fmt_loss(r.best_val)),
        ("tok/s", lambda r: "" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"),
        ("wall", lambda r: fmt_duration(r.wall_s)),
    ]
    if len({r.data for r in rows if r.data}) > 1:  # rows trained on different data
        columns.append(("data", lambda r: r.data))
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


def fmt_override(override: str) -> str:
    """`key=value` with its value as fmt_param writes it."""
    key, sep, value = override.partition("=")
    return f"{key}{sep}{fmt_param(value)}" if sep else override


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
    dropped = []
    for drop in DROP_FIRST:
        if _table_width(rows, columns) <= console.width:
            break
        dropped += [c[0] for c in columns if c[0] == drop]
        columns = [c for c in columns if c[0] != drop]
    console.print(_rich_table(rows, columns, title))
    if dropped:
        console.print(f"({console.width} columns: {', '.join(dropped)} left out; a wider "
                      "terminal, --format csv or --output FILE shows them)")  # fmt: skip


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
    header += ["tokens_per_s", "wall_s", "wandb_run", "best", "data"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        record = [r.job, *([r.trial, r.objective] if optuna else [])]
        record += [r.params.get(key, "") for key in params]
        record += [r.cluster, r.status, r.error, r.step, r.steps, r.final_val, r.best_val]
        record += [r.tokens_per_s, None if r.wall_s is None else round(r.wall_s, 1)]
        record += [r.wandb_run, "true" if r.best else "false", r.data]
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
                    and finite((j.result or {}).get("value"))]  # fmt: skip
            if done:
                pick = max if wants_max(journal, {}) else min
                j = pick(done, key=lambda j: j.result["value"])
                # The searched params: declared as sweeps, or varying across the trials.
                sweep = Path(sweep_dir)
                all_overrides = [overrides_dict(t.overrides) for t in trials]
                keys = swept_keys(
                    all_overrides, declared_sweep_keys(sweep, sweep_hydra_config(sweep, {}))
                )
                params = overrides_dict(j.overrides)
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
    return f"{value:.4g}" if is_number(value) else str(value)


def prediction_errors_text(sweep_dir: str | Path) -> str | None:
    """How well time-to-result placement predicted, per cluster (markdown): the median absolute
    error of its start predictions, of Slurm's own estimates, of its run times. None for a
    sweep placed without predictions."""
    from lingua_sweep.sweep.predictions import prediction_errors

    journal = read_journal(Path(sweep_dir))
    errors = prediction_errors(list(journal.jobs.values())) if journal else {}
    if not errors:
        return None

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = ["prediction error (median absolute, s), jobs placed by time-to-result:", "",
             "| cluster | jobs | start | Slurm's estimate | run time |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, e in errors.items():
        lines.append(f"| {name} | {e['jobs']} | {secs(e['start_error_s'])} | "
                     f"{secs(e['slurm_error_s'])} | {secs(e['run_error_s'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"
