"""`lingua-sweep status | cancel | resume | login`: a sweep from its journal alone.

These need neither the command line nor the conf dirs that started the sweep: the journal's
header holds the command, the working dir and every cluster definition it used.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError
from lingua_sweep.sweep import clock, layout, remote
from lingua_sweep.sweep.controller import Controller
from lingua_sweep.sweep.journal import Journal
from lingua_sweep.sweep.monitor import job_rows, render, shown_jobs, totals_text, waiting_words
from lingua_sweep.sweep.params import LauncherParams
from lingua_sweep.sweep.states import FINAL
from lingua_sweep.sweep.tails import Tail


def open_journal(sweep_dir: str | Path) -> Journal:
    journal = Journal(Path(sweep_dir).expanduser())
    if not journal.exists():
        raise UserError(
            f"{sweep_dir} has no sweep journal ({journal.path.name}); pass the sweep dir that a "
            "`-m ... hydra/launcher=multicluster` run printed"
        )
    return journal


def controller_from_journal(sweep_dir: str | Path, *, timeout_s: float = 30.0) -> Controller:
    """A controller that can watch and cancel the sweep's jobs, but not compose new ones."""
    journal = open_journal(sweep_dir)
    header = journal.replay().header
    registry = {
        name: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClusterConfig), raw))
        for name, raw in header.get("cluster_configs", {}).items()
    }
    fields = LauncherParams.__dataclass_fields__
    known = {k: v for k, v in header.get("params", {}).items() if k in fields}
    params = LauncherParams(**{**known, "remote_timeout_s": timeout_s, "clusters": list(registry)})
    code_root = Path(header.get("code", {}).get("root") or Path.cwd())
    return Controller(
        sweep_dir=journal.dir, params=params, registry=registry, here=None, code_root=code_root
    )


def status(sweep_dir: str, *, as_json: bool, offline: bool, out=None) -> int:
    """The sweep's jobs as the journal has them; with the clusters' live states unless offline."""
    controller = controller_from_journal(sweep_dir)
    live_states: dict[int, tuple[str, str | None]] = {}
    unreachable = {}
    if not offline:
        for name, link in controller.links.items():
            mine, request = controller.poll_request(name, files="open")
            if not mine:
                continue
            try:
                reply = link.backend.poll(request)
            except remote.RemoteError as e:
                unreachable[name] = e.reason
                continue
            for j in mine:
                live = reply["states"].get(j.job_id, {})
                live_states[j.index] = (live.get("state", "UNKNOWN"), live.get("reason"))
                piece = reply["files"].get(controller.metrics_path(j))
                if piece is not None:
                    controller.tails.setdefault(j.index, Tail()).feed(piece)
    state = controller.state
    shown, left_out = (sorted(state.jobs), "") if as_json else shown_jobs(state)
    rows = job_rows(state, controller.sweep_dir, controller.tails,
                    _total_steps(controller, shown), indices=shown)  # fmt: skip
    for row in rows:
        if row.index in live_states and row.state not in FINAL:
            row.state, reason = live_states[row.index]
            if row.state == "PENDING" and reason:
                row.note = waiting_words(state.jobs[row.index], reason)
    if as_json:
        payload = {
            "sweep_dir": str(controller.sweep_dir),
            "unreachable": unreachable,
            "jobs": [row.__dict__ for row in rows],
        }
        print(json.dumps(payload, indent=1, default=str), file=out or sys.stdout)
        return 0
    from rich.console import Console

    console = Console(file=out or sys.stdout)
    counts: dict[str, int] = {}
    for job in state.jobs.values():
        counts[job.state] = counts.get(job.state, 0) + 1
    if live_states:  # what the clusters say now, for the jobs the journal has not closed
        for index, (live, _) in live_states.items():
            old = state.jobs[index].state
            if old not in FINAL:
                counts[old] -= 1
                counts[live] = counts.get(live, 0) + 1
    title = f"sweep {controller.sweep_dir}  ·  {totals_text(counts, len(state.jobs))}"
    console.print(render(rows, title=title))
    if left_out:
        console.print(left_out, soft_wrap=True)
    for name, reason in unreachable.items():
        console.print(f"  {name} unreachable: {reason}", style="red", soft_wrap=True)
    return 0


def _total_steps(controller: Controller, indices: list[int]) -> dict[int, int]:
    """Each job's `steps`, from the resolved config the trainer wrote in its dir (if any)."""
    out = {}
    for index in indices:
        path = Path(layout.job_dir(controller.sweep_dir, index)) / ".hydra" / "config.yaml"
        try:
            steps = OmegaConf.load(path).get("steps")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(steps, int):
            out[index] = steps
    return out


def cancel(sweep_dir: str, *, wait_s: float = 300.0) -> int:
    """Cancels every job of the sweep that is not final, on every cluster, from the journal.

    While a launcher runs the sweep, it is the one that cancels: this only asks it (a `cancel`
    record, which it reads each cycle) and waits until it has, or until it is gone (then this
    takes over). Writing beside it from an older picture of the sweep is how two writers
    disagree."""

    journal = open_journal(sweep_dir)
    deadline = clock.monotonic() + wait_s
    asked = False
    while True:
        try:
            journal.lock()
            break
        except UserError:
            pass
        if not asked:
            if not journal.replay().cancel_requested:
                journal.append("cancel", reason="cancelled by `lingua-sweep cancel`")
            print(f"a launcher is running {journal.dir}: asked it to cancel the sweep",
                  file=sys.stderr)  # fmt: skip
            asked = True
        state = journal.replay()
        if all(j.final for j in state.jobs.values()) and not state.intents:
            return _cancelled(state, journal.dir, [])
        if clock.monotonic() >= deadline:
            print(f"the launcher has not confirmed every cancel after {wait_s:.0f}s; see "
                  f"`lingua-sweep status {journal.dir}`", file=sys.stderr)  # fmt: skip
            return 1
        clock.sleep(1.0)
    try:
        controller = controller_from_journal(sweep_dir)
        problems = controller.cancel_all("cancelled by `lingua-sweep cancel`")
    finally:
        journal.unlock()
    return _cancelled(controller.state, controller.sweep_dir, problems)


def _cancelled(state, sweep_dir: Path, problems: list[str]) -> int:
    for problem in problems:
        print(f"could not cancel on {problem}; run `lingua-sweep cancel` again", file=sys.stderr)
    cancelled = sum(1 for j in state.jobs.values() if j.state == "CANCELLED")
    print(f"{cancelled} job(s) cancelled in {sweep_dir}")
    return 1 if problems else 0


def resume(sweep_dir: str) -> int:
    """Runs the sweep's own command again on the same sweep dir, to its end: it reattaches,
    and collects (a sweep started with detach=true is resumed attached)."""
    journal = open_journal(sweep_dir)
    header = journal.replay().header
    replaced = ("hydra.sweep.dir=", "hydra.launcher.detach=", "hydra.launcher.resume=")
    argv = [a for a in header["argv"] if not a.lstrip("+").startswith(replaced)]
    argv += [f"hydra.sweep.dir={journal.dir.resolve()}", "hydra.launcher.detach=false",
             "hydra.launcher.resume=true"]  # fmt: skip
    print("resuming:", " ".join(argv), file=sys.stderr)
    cwd = header.get("cwd") or os.getcwd()
    if not Path(cwd).is_dir():
        raise UserError(f"the sweep was started in {cwd}, which is not here; cd to the project")
    return subprocess.run(argv, cwd=cwd, check=False).returncode


def login(cluster: ClusterConfig) -> int:
    """Opens the shared ssh connection interactively (password, 2FA); sweeps then reuse it."""
    if not cluster.login:
        raise UserError(f"cluster {cluster.name} has no login node: nothing to log in to")
    rc = remote.open_master(cluster.login, cluster.ssh_options)
    if rc == 0:
        minutes = remote.CONTROL_PERSIST_S // 60
        print(f"connected to {cluster.login}; sweeps reuse this connection "
              f"({minutes} min after its last use)")  # fmt: skip
    return rc
