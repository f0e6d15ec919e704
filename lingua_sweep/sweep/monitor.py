"""What a person sees of a sweep: a live table while it runs, the summary when it ends.

On a terminal the table refreshes in place (rich); otherwise (a log file, CI) one line per state
change and a totals line every `PLAIN_EVERY_S`. `lingua-sweep status` prints the same rows.
"""

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from lingua_sweep.results_table import fmt_override
from lingua_sweep.sweep import clock, layout
from lingua_sweep.sweep.journal import FINAL, JobEntry
from lingua_sweep.sweep.predictions import pending_note
from lingua_sweep.sweep.states import pending_words
from lingua_sweep.sweep.tails import Tail, progress

PLAIN_EVERY_S = 30.0
FULL_TABLE_ROWS = 40  # a larger sweep's live table shows its running jobs and latest changes
SUMMARY_ROWS = 200  # a larger sweep's summary lists the jobs that did not complete
STYLES = {
    "COMPLETED": "green", "FAILED": "red", "CANCELLED": "yellow", "PRUNED": "magenta",
    "RUNNING": "cyan", "PENDING": "dim", "QUEUED": "dim",
}  # fmt: skip


@dataclass(kw_only=True)
class Row:
    index: int
    params: str
    cluster: str
    job_id: str
    state: str
    step: int | None
    total: int | None
    loss: float | None
    elapsed_s: float | None
    note: str


def job_rows(
    state,
    sweep_dir: Path,
    live: dict[int, Tail],
    totals: dict[int, int],
    ended: dict | None = None,
    *,
    indices: list[int] | None = None,
) -> list[Row]:
    """The table's rows (of `indices`, or all): running jobs' progress from their tails (what
    polls brought), the others' from the metrics.jsonl in their local dir, read once per ended
    job with `ended` (a cache the caller keeps)."""
    shared = shared_overrides(state.jobs.values())
    now = clock.now()
    indices = sorted(state.jobs) if indices is None else indices
    return [job_row(state.jobs[i], shared, sweep_dir, live, totals, ended, now) for i in indices]


def shown_jobs(state) -> tuple[list[int], str]:
    """Which jobs a table lists: all of a sweep up to SUMMARY_ROWS jobs; of a larger one, those
    that did not complete (the first SUMMARY_ROWS). And a note saying what was left out."""
    if len(state.jobs) <= SUMMARY_ROWS:
        return sorted(state.jobs), ""
    rest = sorted(i for i, j in state.jobs.items() if j.state != "COMPLETED")
    completed = len(state.jobs) - len(rest)
    note = f"{completed} completed jobs not listed (`lingua-sweep results` has them all)"
    if len(rest) > SUMMARY_ROWS:
        note += f"; {len(rest) - SUMMARY_ROWS} more not listed (--json lists every job)"
    return rest[:SUMMARY_ROWS], note


def shared_overrides(jobs) -> set[str]:
    """The overrides every job has: noise in a row, which shows what varies."""
    jobs = list(jobs)
    return set.intersection(*(set(j.overrides) for j in jobs)) if len(jobs) > 1 else set()


def job_row(job, shared, sweep_dir, live, totals, ended, now) -> Row:
    tail = live.get(job.index)
    if tail is not None and not job.final:
        step, loss = tail.step, tail.loss
    elif ended is not None and job.final and job.index in ended:
        step, loss = ended[job.index]
    elif job.final or job.started_at is not None:
        path = Path(layout.job_dir(sweep_dir, job.index)) / layout.METRICS_FILE
        step, loss = progress(path.read_text(errors="replace") if path.exists() else None)
        if ended is not None and job.final:
            ended[job.index] = (step, loss)
    else:
        step, loss = None, None  # never started: nothing to read
    if job.result and job.result.get("step") is not None:
        step = job.result["step"]
    end = job.ended_at or now
    return Row(
        index=job.index,
        params=" ".join(fmt_override(o) for o in job.overrides if o not in shared),
        cluster=job.cluster or "-",
        job_id=job.job_id or "-",
        state=job.state,
        step=step,
        total=totals.get(job.index),
        loss=loss,
        elapsed_s=end - job.started_at if job.started_at else None,
        note=(job.result or {}).get("error") or waiting_words(job),
    )


def waiting_words(job: JobEntry, reason: str | None = None) -> str:
    """Why a job waits (Slurm's `reason`, by default the journal's) and, under time-to-result
    placement, when it should start and where else it could have gone."""
    words = [w for w in (pending_words(reason or job.reason), pending_note(job)) if w]
    return "; ".join(words)


def render(rows: list[Row], *, title: str, clusters_note: str = "") -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, caption=clusters_note)
    for name, kw in [
        ("#", {"justify": "right"}), ("params", {"overflow": "fold", "min_width": 14}),
        ("cluster", {}), ("job", {}), ("state", {"no_wrap": True}),
        ("step", {"justify": "right", "no_wrap": True}),
        ("loss", {"justify": "right", "no_wrap": True}), ("elapsed", {"justify": "right"}),
        ("note", {"overflow": "fold", "ratio": 1}),
    ]:  # fmt: skip
        table.add_column(name, **kw)
    for r in rows:
        step = "-" if r.step is None else (f"{r.step}/{r.total}" if r.total else str(r.step))
        table.add_row(
            str(r.index), r.params, r.cluster, r.job_id,
            f"[{STYLES.get(r.state, 'white')}]{r.state}[/]", step,
            "-" if r.loss is None else f"{r.loss:.4g}", _duration(r.elapsed_s), r.note,
        )  # fmt: skip
    return table


def totals_line(rows: list[Row]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    return totals_text(counts, len(rows))


def totals_text(counts: dict[str, int], total: int) -> str:
    done = sum(counts.get(s, 0) for s in FINAL)
    parts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()) if n)
    return f"{done}/{total} done ({parts})"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Monitor:
    """Keeps one row per job, recomputed only for jobs a journal record touched and running
    ones (their progress moves): a cycle costs O(changed + running), not O(sweep)."""

    def __init__(self, *, live: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream)
        self.live = self.console.is_terminal if live is None else live
        self._live: Live | None = None
        self._rows: dict[int, Row] = {}
        self._counts: dict[str, int] = {}
        self._seen: dict[int, str] = {}  # job index -> the state last printed (plain mode)
        self._ended: dict[int, tuple] = {}  # ended jobs' (step, loss), read once
        self._shared: set[str] = set()
        self._known = 0  # jobs when `_shared` was computed
        self._last_plain = clock.monotonic()  # the first totals line after PLAIN_EVERY_S
        self._recent: list[int] = []  # the latest jobs to change state (a large sweep's view)

    def _refresh(self, controller) -> list[Row]:
        """Brings the rows up to date; returns those whose state changed."""
        state = controller.state
        touched = state.take_touched()
        if len(state.jobs) != self._known:  # new jobs: what varies may have changed
            self._shared = shared_overrides(state.jobs.values())
            self._known = len(state.jobs)
            touched = set(state.jobs)
        running = state.by_state.get("RUNNING", set())
        now, changed = clock.now(), []
        for index in sorted(touched | running):
            row = job_row(state.jobs[index], self._shared, controller.sweep_dir,
                          controller.tails, _totals(controller), self._ended, now)  # fmt: skip
            old = self._rows.get(index)
            if old is not None:
                self._counts[old.state] -= 1
            self._counts[row.state] = self._counts.get(row.state, 0) + 1
            self._rows[index] = row
            if old is None or old.state != row.state:
                changed.append(row)
        return changed

    def totals(self) -> str:
        return totals_text(self._counts, len(self._rows))

    def update(self, controller) -> None:
        changed = self._refresh(controller)
        down = [f"{n}: {link.reason}" for n, link in controller.links.items() if link.reason]
        note = ("unreachable: " + "; ".join(down)) if down else ""
        if self.live:
            table = render(self._view(changed), clusters_note=note,
                           title=f"sweep {controller.sweep_dir}  ·  {self.totals()}")  # fmt: skip
            if self._live is None:
                self._live = Live(table, console=self.console, auto_refresh=False)
                self._live.start()
            self._live.update(table, refresh=True)
            return
        for r in changed:
            if r.state == "QUEUED" and r.index not in self._seen:
                continue  # every job starts queued: its first line is where it went
            if self._seen.get(r.index) != r.state:
                where = f" on {r.cluster} (job {r.job_id})" if r.job_id != "-" else ""
                tail = f": {r.note}" if r.note and r.state in FINAL else ""
                print(f"#{r.index} {r.state}{where} {r.params}{tail}", file=self.stream)
                self._seen[r.index] = r.state
        if clock.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            running = [
                r
                for r in map(self._rows.get, sorted(controller.state.by_state.get("RUNNING", ())))
                if r.step is not None and r.loss is not None
            ]
            progress_part = "; ".join(f"#{r.index} {r.step}/{r.total or '?'} loss {r.loss:.4g}"
                                      for r in running[:FULL_TABLE_ROWS])  # fmt: skip
            print(f"[sweep] {self.totals()}" + (f"; {progress_part}" if progress_part else "")
                  + (f"; {note}" if note else ""), file=self.stream)  # fmt: skip
            self._last_plain = clock.monotonic()
        self.stream.flush()

    def _view(self, changed: list[Row]) -> list[Row]:
        """A small sweep whole; a large one as its running jobs and the latest changes, at
        most FULL_TABLE_ROWS rows (the totals line counts them all)."""
        if len(self._rows) <= FULL_TABLE_ROWS:
            return [self._rows[i] for i in sorted(self._rows)]
        self._recent = ([r.index for r in changed] + self._recent)[:10]
        running = [i for i, r in self._rows.items() if r.state == "RUNNING"][:FULL_TABLE_ROWS]
        picked = sorted(set(running[: FULL_TABLE_ROWS - 10]) | set(self._recent))
        return [self._rows[i] for i in picked]

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def summary(self, controller) -> None:
        """The sweep's end: `lingua-sweep results`' table of the same jobs (final metrics, best
        marked; of a large sweep its best and the jobs that did not complete), then the best
        job's command line to run it again alone."""
        from lingua_sweep import results, results_table

        self.stop()
        self._refresh(controller)
        console = Console(file=self.stream, width=max(self.console.width, 100))
        rows = results.collect(controller.sweep_dir)
        shown = rows
        if len(rows) > SUMMARY_ROWS:
            shown = [r for r in rows if r.best or r.status != "COMPLETED"][:SUMMARY_ROWS]
            shown += [r for r in rows if r.status == "COMPLETED" and not r.best][:10]
        title = f"sweep summary  ·  {self.totals()}"
        study = results_table.optuna_summary(controller.sweep_dir)
        results_table.print_table(shown, console=console,
                                  title=title + (f"\n{study}" if study else ""))  # fmt: skip
        if len(shown) < len(rows):
            console.print(f"({len(rows) - len(shown)} more rows in `lingua-sweep results`)")
        best = next((r for r in rows if r.best), None)
        if best is not None:
            console.print(f"best: #{best.job} {best_words(best)}; to run it again alone:",
                          soft_wrap=True)  # fmt: skip
            console.print(f"  {reuse_command(controller, best.job)}", soft_wrap=True)
        console.print(f"sweep dir: {controller.sweep_dir}", soft_wrap=True)
        console.print(f"results:   lingua-sweep results {controller.sweep_dir}", soft_wrap=True)


def best_words(row) -> str:
    if row.objective is not None:
        return f"objective {row.objective:.4g}"
    return f"val loss {row.final_val:.4g}" if row.final_val is not None else "(best so far)"


def reuse_command(controller, index: int) -> str:
    """`python <the sweep's script> <the job's overrides>`: that one job as a single run."""
    argv = controller.state.header.get("argv") or ["python", "app.py"]
    job = controller.state.jobs.get(index)
    overrides = job.overrides if job is not None else []
    # Not where it ran (a single run finds its cluster), nor Hydra's settings.
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "cluster"
            and not o.startswith(("hydra.", "hydra/"))]  # fmt: skip
    return shlex.join(["python", *argv[1:2], *keep])


def _totals(controller) -> dict[int, int]:
    return controller.totals
