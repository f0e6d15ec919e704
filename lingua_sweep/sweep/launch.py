"""`Launcher.launch` for the multicluster plugin: a batch of Hydra jobs through the controller.

compose and validate every job (a bad override submits nothing) -> record them in the journal
-> the controller's loop until they are final -> JobReturns in job order, so Hydra's basic and
Optuna sweepers work unchanged. Rerunning the same command with the same `hydra.sweep.dir`
reattaches to the sweep instead of starting it again.
"""

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import NoReturn

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from lingua_sweep import clusters
from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError
from lingua_sweep.sweep import dispatch
from lingua_sweep.sweep.compose import JobComposer, experiment_name
from lingua_sweep.sweep.controller import Controller
from lingua_sweep.sweep.journal import QUEUED, Journal, decode_value
from lingua_sweep.sweep.monitor import Monitor
from lingua_sweep.sweep.params import LauncherParams
from lingua_sweep.sweep.watch import RETURNS_WITH_CONFIG_UP_TO

log = logging.getLogger(__name__)
# Sweepers whose jobs are a grid: a failed job fails the run (Optuna's are trial outcomes).
GRID_SWEEPERS = (
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "hydra_plugins.lingua_sweep_launcher.grid_sweeper.GridSweeper",
)
# What a sweep leaves in its dir besides the numbered job dirs.
PREVIOUS_SWEEP_FILES = (
    "journal.jsonl", "optuna.db", "multirun.yaml", "optimization_results.yaml", ".submitit",
    ".submissions",
)  # fmt: skip


class SweepConfigError(CompactHydraException):
    """A user mistake found before anything was submitted; Hydra prints it as one line."""


class SweepFailed(CompactHydraException):
    """Some jobs of a basic sweep failed: one line after the summary table (exit 1)."""


def build_controller(launcher, p: LauncherParams, *, monitor=None) -> Controller:
    cfg = launcher.config
    registry = clusters.load_clusters(searchpath_dirs(cfg))
    sweep_dir = Path(str(cfg.hydra.sweep.dir))
    journal = Journal(sweep_dir)
    if not p.resume and journal.exists() and not p.dry_run:
        set_aside(journal)
    return Controller(
        sweep_dir=sweep_dir,
        params=p,
        registry=registry,
        here=here_cluster(cfg, registry),
        task_function=launcher.task_function,
        composer=JobComposer(cfg, launcher.hydra_context.config_loader),
        monitor=monitor,
    )


def set_aside(journal: Journal) -> None:
    """hydra.launcher.resume=false: the sweep dir's earlier sweep (journal, study, job dirs)
    moves to `previous-<time>/` so that no new job reads an old one's checkpoint or trial;
    never while that sweep runs or has jobs that are not final."""
    journal.lock()  # fails, naming the holder, while a launcher runs it
    try:
        state = journal.replay()
        open_jobs = [j for j in state.jobs.values() if not j.final]
        if open_jobs:
            raise UserError(
                f"hydra.launcher.resume=false: the sweep in {journal.dir} has "
                f"{len(open_jobs)} job(s) not final; `lingua-sweep cancel {journal.dir}` first, "
                "or resume it (resume=true), or use another hydra.sweep.dir"
            )
        aside = journal.dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for path in journal.dir.iterdir():
            if path.name in PREVIOUS_SWEEP_FILES or path.name.isdigit():
                path.rename(aside / path.name)
    finally:
        journal.unlock()
    log.warning("hydra.launcher.resume=false: a new sweep in %s (the earlier one in %s)",
                journal.dir, aside.name)  # fmt: skip


@contextlib.contextmanager
def one_line_errors():
    """What the user can fix is one line, never a traceback: a mistake (UserError), or the
    machine failing the launcher (a full disk, a vanished mount), which stops it with the
    journal intact, to be picked up again by the same command."""
    try:
        yield
    except UserError as e:
        raise SweepConfigError(str(e)) from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise SweepConfigError(
            f"{where}{e.strerror or e}; the sweep stopped with its journal intact: fix this, "
            "then rerun the same command (or `lingua-sweep resume SWEEP_DIR`) to continue it"
        ) from None


def interruptible() -> None:
    """SIGINT is a Ctrl-C (cancel everything, exit 130) even for a launcher started in the
    background of a script, which inherits SIGINT ignored: `kill -INT` must still stop it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def launch(launcher, p: LauncherParams, job_overrides, initial_job_idx: int) -> list[JobReturn]:
    interruptible()
    with one_line_errors():
        return _launch(launcher, p, job_overrides, initial_job_idx)


def _launch(launcher, p: LauncherParams, job_overrides, initial_job_idx: int) -> list[JobReturn]:
    monitor = Monitor(live=p.live)
    try:
        controller = build_controller(launcher, p, monitor=monitor)
    except UserError:
        discard_hydra_record(Path(str(launcher.config.hydra.sweep.dir)))
        raise
    overrides = [list(o) for o in job_overrides]
    if p.dry_run:
        preview(controller, overrides, initial_job_idx)
        raise SystemExit(0)
    controller.open(header={"name": experiment_name(launcher.config)})
    refused = False
    try:
        indices = controller.register(overrides, initial_job_idx)
        controller.run(indices)
    except KeyboardInterrupt:
        cancel_on_ctrl_c(controller, monitor)
    except UserError:
        refused = True
        raise
    finally:
        monitor.stop()
        controller.close()
        write_profile(controller)
        if refused:
            controller.discard()
    if p.detach:
        print(f"submitted; sweep dir: {controller.sweep_dir}\n"
              f"  lingua-sweep status {controller.sweep_dir}\n"
              f"  lingua-sweep resume {controller.sweep_dir}   (collects the results)")  # fmt: skip
        raise SystemExit(0)
    monitor.summary(controller)
    returns = [job_return(controller, i) for i in indices]
    failed = [r for r in returns if r.status != JobStatus.COMPLETED]
    if failed and str(launcher.config.hydra.sweeper.get("_target_")) in GRID_SWEEPERS:
        raise SweepFailed(
            f"{len(failed)} of {len(returns)} jobs did not complete (see the table above); "
            f"`lingua-sweep results {controller.sweep_dir}` has the details"
        )
    return returns


def discard_hydra_record(sweep_dir: Path) -> None:
    """A sweep refused before it had a journal: the multirun.yaml Hydra wrote goes, and the
    dir with it when nothing else is there."""
    if (sweep_dir / "journal.jsonl").exists():
        return
    (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        sweep_dir.rmdir()


def write_profile(controller: Controller) -> None:
    """With LINGUA_SWEEP_PROFILE=<file>: the loop's cycle times, the CPU the sweep took (from
    the controller's start: Python's and Hydra's own start-up left out) and what simulated
    clusters saw, as JSON, for bench/scale.py."""
    path = os.environ.get("LINGUA_SWEEP_PROFILE")
    if not path:
        return
    import resource

    from lingua_sweep.sweep import sim_backend

    cpu_s = time.process_time() - controller.cpu_start  # composing, the loop, its threads
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(path).write_text(json.dumps({"cycle_s": controller.cycle_s, "launch_cpu_s": cpu_s,
                                      "peak_rss_mb": peak_mb,
                                      "polls": controller.watcher.polls,
                                      "simulated": sim_backend.report()}))  # fmt: skip


def cancel_on_ctrl_c(controller: Controller, monitor: Monitor, settle=None) -> NoReturn:
    """Ctrl-C: every queued and running job is cancelled (then `settle`, e.g. the study is
    told), the table says so, exit 130."""
    problems = controller.cancel_all("cancelled (Ctrl-C)")
    if settle is not None:
        settle()
    monitor.summary(controller)
    for problem in problems:
        log.error("could not cancel on %s", problem)
    raise SystemExit(130) from None


def job_return(controller: Controller, index: int) -> JobReturn:
    """The job's own JobReturn when this process saw it finish; else one from the journal."""
    job = controller.state.jobs[index]
    result = job.result or {}
    if result.get("status") == "COMPLETED" and index in controller.returns:
        return controller.returns[index]
    config = controller.configs.get(index)
    small = len(controller.state.jobs) <= RETURNS_WITH_CONFIG_UP_TO
    ret = JobReturn(overrides=job.overrides, cfg=config.materialize() if config and small else None)
    if result.get("status") == "COMPLETED":
        ret.status = JobStatus.COMPLETED
        ret.return_value = decode_value(result)
    else:
        ret.status = JobStatus.FAILED
        ret.return_value = RuntimeError(
            f"job #{index} {job.state}: {result.get('error') or 'no result'}"
        )
    return ret


def preview(controller: Controller, overrides: list[list[str]], first_index: int) -> None:
    """The dry run: every job composed and validated, the clusters probed, the plan printed."""
    from rich.console import Console
    from rich.table import Table

    first = controller.registry[controller.names[0]]
    for offset, o in enumerate(overrides):
        controller.composer.compose(o, first_index + offset, first, str(controller.sweep_dir))
    controller.dispatcher.probe()
    rooms = controller.dispatcher.rooms()
    reachable = controller.dispatcher.reachable_slurm()
    order = [n for n in controller.names if n in rooms and (controller.registry[n].slurm
                                                               or not reachable)]  # fmt: skip
    targets = dispatch.assign(len(overrides), rooms, order,
                              queue_on=reachable[0] if reachable else None,
                              when_busy=controller.p.when_busy)  # fmt: skip
    console = Console(stderr=True)
    table = Table(title="multicluster: clusters (dry run, nothing submitted)")
    for col in ("cluster", "state", "idle nodes", "room now", "jobs"):
        table.add_column(col)
    for name, link in controller.links.items():
        s = link.status
        state = "-" if s is None else (s.state + (f" ({s.reason})" if s.reason else ""))
        table.add_row(name, state, str(s.idle_nodes if s else 0), str(rooms.get(name, 0)),
                      str(targets.count(name)))  # fmt: skip
    console.print(table)
    jobs = Table(title="multicluster: jobs")
    for col in ("#", "cluster", "overrides"):
        jobs.add_column(col)
    for offset, (target, o) in enumerate(zip(targets, overrides, strict=True)):
        jobs.add_row(str(first_index + offset), target or QUEUED.lower(), " ".join(o))
    console.print(jobs)


def searchpath_dirs(cfg: DictConfig) -> list[Path]:
    """Cluster definitions beyond the package's and your user dir: every config source of
    Hydra's search path (`--config-dir`, `hydra.searchpath`, file:// or pkg://) that has a
    `cluster/` dir."""
    import importlib.util

    dirs = []
    for source in cfg.hydra.runtime.get("config_sources") or []:
        if source.schema == "file":
            root = Path(source.path)
        elif source.schema == "pkg":
            spec = importlib.util.find_spec(source.path.replace("/", "."))
            if spec is None or not spec.submodule_search_locations:
                continue
            root = Path(next(iter(spec.submodule_search_locations)))
        else:
            continue
        if (root / "cluster").is_dir() and root.resolve() != clusters.CLUSTER_DIR.parent:
            dirs.append(root)
    return dirs


def here_cluster(cfg: DictConfig, registry: dict[str, ClusterConfig]) -> ClusterConfig | None:
    """The cluster this launcher runs on: the trainer's config says; otherwise detect it."""
    if "cluster" in cfg and cfg.cluster.get("name") in registry:
        return registry[cfg.cluster.name]
    try:
        return registry[clusters.detect_cluster(registry)]
    except UserError:
        return None
