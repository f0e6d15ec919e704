"""`lingua-sweep ls | logs`: finding a sweep, and reading a job's log wherever it ran.

`ls` lists the sweeps (dirs with a journal) under the usual roots, newest first: Hydra's
`multirun/` (and `outputs/`) of this dir, or the roots given. `logs` prints a job's log (the
trainer's train.log, else submitit's stderr of its last Slurm job), read from its cluster
through the same agent the launcher polls with, from an offset: `-f` follows it, fetching only
what is new, until the job ends.
"""

import os
import sys
import time
from pathlib import Path

from lingua_sweep.errors import UserError
from lingua_sweep.sweep import clock, remote
from lingua_sweep.sweep.check import launcher_running
from lingua_sweep.sweep.journal import JOURNAL_FILE, Journal

DEFAULT_ROOTS = ("multirun", "outputs")
MAX_DEPTH = 4  # multirun/<date>/<time>/journal.jsonl, and a level more
LOG_FILE = "train.log"


def find_sweeps(roots: list[str]) -> list[Path]:
    found = []
    for root in map(Path, roots):
        if (root / JOURNAL_FILE).exists():
            found.append(root)
            continue
        base = len(root.parts)
        for dirpath, dirnames, filenames in os.walk(root):
            if JOURNAL_FILE in filenames:
                found.append(Path(dirpath))
                dirnames.clear()  # a sweep's job dirs hold no other sweep
            elif len(Path(dirpath).parts) - base >= MAX_DEPTH:
                dirnames.clear()
            else:
                dirnames[:] = [d for d in dirnames if not d.isdigit() and not d.startswith(".")]
    return found


def list_sweeps(roots: list[str], *, limit: int = 20, out=None) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from lingua_sweep.results_table import fmt_override

    roots = roots or [r for r in DEFAULT_ROOTS if Path(r).is_dir()]
    sweeps = []
    for sweep in find_sweeps(roots):
        state = Journal(sweep).replay()
        started = state.header.get("t") or 0.0
        sweeps.append((started, sweep, state))
    if not sweeps:
        where = ", ".join(roots) or "multirun/ or outputs/ here"
        raise UserError(f"no sweep (a dir with {JOURNAL_FILE}) under {where}; pass its root")
    sweeps.sort(key=lambda s: s[0], reverse=True)
    table = Table(title=f"sweeps under {', '.join(roots)}, newest first", title_justify="left",
                  box=box.SIMPLE_HEAD)  # fmt: skip
    for name in ("dir", "started", "name", "jobs", "state", "best"):
        table.add_column(name, overflow="fold", no_wrap=name in ("started", "jobs"))
    for started, sweep, state in sweeps[:limit]:
        counts: dict[str, int] = {}
        for job in state.jobs.values():
            counts[job.state] = counts.get(job.state, 0) + 1
        done = sum(j.final for j in state.jobs.values())
        running = "running" if launcher_running(sweep) else ("done" if done == len(state.jobs)
                                                             else "stopped")  # fmt: skip
        detail = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        table.add_row(str(sweep), time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
                      str(state.header.get("name", "")), f"{done}/{len(state.jobs)}",
                      f"{running} ({detail})" if detail else running,
                      best_of(state, fmt_override))  # fmt: skip
    Console(file=out or sys.stdout).print(table)
    if len(sweeps) > limit:
        print(f"({len(sweeps) - limit} older sweeps not listed: --all)", file=out or sys.stdout)
    return 0


def best_of(state, fmt_override) -> str:
    """The best completed job's value and what varies in it, from the journal alone."""
    done = [j for j in state.jobs.values() if j.state == "COMPLETED"
            and isinstance((j.result or {}).get("value"), int | float)]  # fmt: skip
    if not done:
        return "-"
    from lingua_sweep.results import wants_max

    pick = max if wants_max(state, {}) else min
    best = pick(done, key=lambda j: j.result["value"])
    shared = set.intersection(*(set(j.overrides) for j in state.jobs.values()))
    varying = " ".join(fmt_override(o) for o in best.overrides if o not in shared)
    return f"{best.result['value']:.4g} (#{best.index} {varying})".replace(" )", ")")


def job_logs(
    sweep_dir: str, index: int, *, follow: bool, lines: int = 50, out=None, every_s: float = 2.0
) -> int:
    """The job's log, its last `lines` lines; with `follow`, what it writes until it ends (read
    again every `every_s` seconds)."""
    from lingua_sweep.sweep.verbs import controller_from_journal

    out = out or sys.stdout
    c = controller_from_journal(sweep_dir)
    job = c.state.jobs.get(index)
    if job is None:
        raise UserError(f"{sweep_dir} has no job #{index} (jobs 0-{len(c.state.jobs) - 1})")
    if job.cluster is None or job.job_id is None:
        raise UserError(f"job #{index} is {job.state}: it has not run anywhere yet")
    link = c.links.get(job.cluster)
    if link is None:
        raise UserError(f"job #{index} ran on {job.cluster}, which this sweep no longer knows")
    candidates = [f"{c.job_dir(job)}/{LOG_FILE}"]
    if job.folder:
        folder = job.folder.replace("%j", job.job_id.split("_")[0])
        candidates.append(f"{folder}/{job.job_id}_0_log.err")
    path, piece = None, None
    for path in candidates:
        piece = _read(link, path, None)
        if piece is not None:
            break
    if piece is None:
        raise UserError(f"job #{index} ({job.cluster} job {job.job_id}) has no log yet: "
                        f"looked for {', '.join(candidates)}")  # fmt: skip
    text = piece["text"]
    out.write("".join(text.splitlines(keepends=True)[-lines:]))
    offset = piece["end"]
    while follow:
        out.flush()
        state = Journal(c.sweep_dir).replay().jobs[index]
        if state.final:
            print(f"[job #{index} {state.state}]", file=sys.stderr)
            return 0
        clock.sleep(every_s)
        piece = _read(link, path, offset)
        if piece is not None and piece["end"] != offset:
            out.write(piece["text"])
            offset = piece["end"]
    return 0


def _read(link, path: str, offset: int | None) -> dict | None:
    """A file's bytes from `offset` on the job's cluster, through its agent (as polls are)."""
    try:
        reply = link.backend.poll({"jobs": [], "files": {path: offset}, "prefix": None})
    except remote.RemoteError as e:
        raise UserError(f"cluster {link.config.name} does not answer: {e.reason}") from e
    return reply.get("files", {}).get(path)
