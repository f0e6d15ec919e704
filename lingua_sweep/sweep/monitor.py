"""What a person sees of a sweep: a live table while it runs, the summary when it ends.

On a terminal the table refreshes in place (rich); otherwise (a log file, CI) one line per state
change and a totals line every `PLAIN_EVERY_S`. `lingua-sweep status` prints the same rows.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from lingua_sweep.sweep import layout
from lingua_sweep.sweep.journal import FINAL
from lingua_sweep.sweep.states import pending_words
from lingua_sweep.sweep.tails import Tail, progress

PLAIN_EVERY_S = 30.0
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
    state, sweep_dir: Path, live: dict[int, Tail], totals: dict[int, int], ended: dict | None = None
):
    """The table's rows: running jobs' progress from their tails (what polls brought), the
    others' from the metrics.jsonl in their local dir, read once per ended job with `ended`
    (a cache the caller keeps)."""
    now = time.time()
    rows = []
    jobs = sorted(state.jobs.values(), key=lambda j: j.index)
    # Only what varies says which job is which; the overrides all jobs share are noise.
    shared = set.intersection(*(set(j.overrides) for j in jobs)) if len(jobs) > 1 else set()
    for job in jobs:
        tail = live.get(job.index)
        if tail is not None and not job.final:
            step, loss = tail.step, tail.loss
        elif ended is not None and job.final and job.index in ended:
            step, loss = ended[job.index]
        else:
            path = Path(layout.job_dir(sweep_dir, job.index)) / layout.METRICS_FILE
            step, loss = progress(path.read_text(errors="replace") if path.exists() else None)
            if ended is not None and job.final:
                ended[job.index] = (step, loss)
        if job.result and job.result.get("step") is not None:
            step = job.result["step"]
        end = job.ended_at or now
        rows.append(
            Row(
                index=job.index,
                params=" ".join(o for o in job.overrides if o not in shared),
                cluster=job.cluster or "-",
                job_id=job.job_id or "-",
                state=job.state,
                step=step,
                total=totals.get(job.index),
                loss=loss,
                elapsed_s=end - job.started_at if job.started_at else None,
                note=(job.result or {}).get("error") or pending_words(job.reason),
            )
        )
    return rows


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
    done = sum(counts.get(s, 0) for s in FINAL)
    parts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    return f"{done}/{len(rows)} done ({parts})"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Monitor:
    def __init__(self, *, live: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream)
        self.live = self.console.is_terminal if live is None else live
        self._live: Live | None = None
        self._seen: dict[int, str] = {}
        self._ended: dict[int, tuple] = {}  # ended jobs' (step, loss), read once
        self._last_plain = 0.0

    def update(self, controller) -> None:
        rows = job_rows(controller.state, controller.sweep_dir, controller.tails,
                        _totals(controller), self._ended)  # fmt: skip
        down = [f"{n}: {link.reason}" for n, link in controller.links.items() if link.reason]
        note = ("unreachable: " + "; ".join(down)) if down else ""
        if self.live:
            table = render(rows, title=f"sweep {controller.sweep_dir}  ·  {totals_line(rows)}",
                           clusters_note=note)  # fmt: skip
            if self._live is None:
                self._live = Live(table, console=self.console, auto_refresh=False)
                self._live.start()
            self._live.update(table, refresh=True)
            return
        for r in rows:
            if self._seen.get(r.index) != r.state:
                where = f" on {r.cluster} (job {r.job_id})" if r.job_id != "-" else ""
                tail = f": {r.note}" if r.note and r.state in FINAL else ""
                print(f"#{r.index} {r.state}{where} {r.params}{tail}", file=self.stream)
                self._seen[r.index] = r.state
        if time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            progress_part = "; ".join(
                f"#{r.index} {r.step}/{r.total or '?'} loss {r.loss:.4g}"
                for r in rows
                if r.state == "RUNNING" and r.step is not None and r.loss is not None
            )
            print(f"[sweep] {totals_line(rows)}" + (f"; {progress_part}" if progress_part else "")
                  + (f"; {note}" if note else ""), file=self.stream)  # fmt: skip
            self._last_plain = time.monotonic()
        self.stream.flush()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def summary(self, controller) -> None:
        self.stop()
        rows = job_rows(controller.state, controller.sweep_dir, controller.tails,
                        _totals(controller))  # fmt: skip
        console = Console(file=self.stream, width=max(self.console.width, 100))
        console.print(render(rows, title=f"sweep summary  ·  {totals_line(rows)}"))
        console.print(f"sweep dir: {controller.sweep_dir}", soft_wrap=True)
        console.print(f"results:   lingua-sweep results {controller.sweep_dir}", soft_wrap=True)


def _totals(controller) -> dict[int, int]:
    out = {}
    for index, config in controller.configs.items():
        steps = config.get("steps") if hasattr(config, "get") else None
        if isinstance(steps, int):
            out[index] = steps
    return out
