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
from lingua_sweep.sweep import remote
from lingua_sweep.sweep.controller import Controller
from lingua_sweep.sweep.journal import Journal
from lingua_sweep.sweep.monitor import job_rows, render, totals_line
from lingua_sweep.sweep.params import LauncherParams


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
    live_states: dict[int, str] = {}
    unreachable = {}
    if not offline:
        for name, link in controller.links.items():
            mine = [j for j in controller.open_jobs() if j.cluster == name]
            if not mine:
                continue
            link.backend.code = _snapshot_of(controller, name)
            request = {
                "jobs": [{"id": j.job_id, "folder": j.folder, "tasks": j.tasks} for j in mine],
                "files": [controller._metrics_path(j) for j in mine],
            }
            try:
                reply = link.backend.poll(request)
            except remote.RemoteError as e:
                unreachable[name] = e.reason
                continue
            for j in mine:
                live_states[j.index] = reply["states"].get(j.job_id, {}).get("state", "UNKNOWN")
                text = reply["files"].get(controller._metrics_path(j))
                if text:
                    controller.metrics[j.index] = text
    rows = job_rows(controller.state, controller.sweep_dir, controller.metrics,
                    _total_steps(controller))  # fmt: skip
    for row in rows:
        if row.index in live_states and row.state not in ("COMPLETED", "FAILED", "CANCELLED"):
            row.state = live_states[row.index]
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
    console.print(render(rows, title=f"sweep {controller.sweep_dir}  ·  {totals_line(rows)}"))
    for name, reason in unreachable.items():
        console.print(f"  {name} unreachable: {reason}", style="red", soft_wrap=True)
    return 0


def _total_steps(controller: Controller) -> dict[int, int]:
    """Each job's `steps`, from the resolved config the trainer wrote in its dir (if any)."""
    out = {}
    for index in controller.state.jobs:
        path = controller.sweep_dir / str(index) / ".hydra" / "config.yaml"
        try:
            steps = OmegaConf.load(path).get("steps")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(steps, int):
            out[index] = steps
    return out


def _snapshot_of(controller: Controller, cluster: str) -> dict:
    """The agent must run from the sweep's own snapshot on the login node; find it by name."""
    from lingua_sweep.sweep.backends import SshBackend

    link = controller.links[cluster]
    if not isinstance(link.backend, SshBackend):
        return {}
    for record in controller.state.extra:
        if record["kind"] == "code" and record["cluster"] == cluster:
            return {"snapshot": record["snapshot"], "env_dir": record["env_dir"]}
    link.backend.prepare()  # never submitted there: any snapshot of this code will do
    return link.backend.code


def cancel(sweep_dir: str) -> int:
    """Cancels every job of the sweep that is not final, on every cluster, from the journal."""
    controller = controller_from_journal(sweep_dir)
    for name in {j.cluster for j in controller.open_jobs()} | {
        i["cluster"] for i in controller.state.intents.values()
    }:
        if name in controller.links:
            controller.links[name].backend.code = _snapshot_of(controller, name)
    problems = controller.cancel_all("cancelled by `lingua-sweep cancel`")
    for problem in problems:
        print(f"could not cancel on {problem}; run `lingua-sweep cancel` again", file=sys.stderr)
    cancelled = sum(1 for j in controller.state.jobs.values() if j.state == "CANCELLED")
    print(f"{cancelled} job(s) cancelled in {controller.sweep_dir}")
    return 1 if problems else 0


def resume(sweep_dir: str) -> int:
    """Runs the sweep's own command again on the same sweep dir: it reattaches."""
    journal = open_journal(sweep_dir)
    header = journal.replay().header
    argv = [a for a in header["argv"] if not a.lstrip("+").startswith("hydra.sweep.dir=")]
    argv.append(f"hydra.sweep.dir={journal.dir.resolve()}")
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
