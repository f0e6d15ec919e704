"""The `multicluster` launcher's logic: compose, validate, probe, plan, submit, collect.

compose every job locally (a bad override fails here; nothing is submitted)
-> probe the clusters in parallel -> plan job -> cluster, filling idle nodes in priority
order -> submit each cluster's share as one submitit array (in-process for a local Slurm,
through `lingua_sweep.agent` on the login node for a remote one) -> wait -> JobReturns in
job order, so Hydra's basic and Optuna sweepers work unchanged.
"""

import base64
import contextlib
import copy
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from lingua_sweep import agent, clusters, remote
from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
WHEN_BUSY = ("queue", "fail")


@dataclass(kw_only=True)
class LauncherParams:
    """Mirrors the plugin's config (hydra_plugins/lingua_sweep_launcher)."""

    clusters: list[str] | None = None
    cluster: str | None = None
    probe_timeout_s: float | None = None
    dry_run: bool = False
    when_busy: str = "queue"
    nodes: int = 1
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    timeout_min: int = 240
    signal_delay_s: int = 120
    max_num_timeout: int = 3
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    local_parallel: int = 2
    poll_interval_s: float = 5.0
    remote_timeout_s: float = 120.0


# --- planning -------------------------------------------------------------------------------


def plan(
    n_jobs: int,
    statuses: list[clusters.ClusterStatus],
    registry: dict[str, ClusterConfig],
    p: LauncherParams,
) -> list[str]:
    """Cluster name per job: idle capacity first in priority order, then the `when_busy` rule."""
    by_name = {s.name: s for s in statuses}
    ordered = [registry[s.name] for s in statuses]  # statuses come in priority order
    slurm = [
        c
        for c in ordered
        if c.slurm and p.nodes <= c.max_nodes and by_name[c.name].state in ("idle", "busy")
    ]
    assignment: list[str] = []
    for c in slurm:
        capacity = by_name[c.name].idle_nodes // p.nodes
        assignment += [c.name] * min(capacity, n_jobs - len(assignment))
    leftover = n_jobs - len(assignment)
    if leftover == 0:
        return assignment
    if slurm:
        if p.when_busy == "fail":
            raise UserError(
                f"{leftover} of {n_jobs} jobs find no idle nodes on {[c.name for c in slurm]}; "
                "set hydra.launcher.when_busy=queue to queue them on the first reachable cluster"
            )
        return assignment + [slurm[0].name] * leftover
    local = [c for c in ordered if not c.slurm]
    if local:
        return assignment + [local[0].name] * leftover
    reasons = "; ".join(f"{s.name}: {s.reason or s.state}" for s in statuses)
    raise UserError(f"no cluster can take the sweep ({reasons}); check `lingua-sweep clusters`")


def print_plan(statuses, assignment: list[str], overrides, registry) -> None:
    console = Console(stderr=True)
    table = Table(title="multicluster: clusters")
    for col in ("cluster", "provider", "state", "idle nodes", "jobs"):
        table.add_column(col)
    for s in statuses:
        c = registry[s.name]
        state = s.state if not s.reason else f"{s.state} ({s.reason})"
        table.add_row(s.name, c.provider, state, str(s.idle_nodes), str(assignment.count(s.name)))
    console.print(table)
    jobs = Table(title="multicluster: jobs")
    for col in ("#", "cluster", "overrides"):
        jobs.add_column(col)
    for i, (cluster, ovr) in enumerate(zip(assignment, overrides, strict=True)):
        shown = [o for o in filter_overrides(ovr) if not o.startswith("cluster=")]
        jobs.add_row(str(i), cluster, " ".join(shown))
    console.print(jobs)


# --- composing ------------------------------------------------------------------------------


class JobComposer:
    """Composes each job's full config on its cluster; raises UserError on any config mistake.

    Hydra composes a config in ~0.3 s, which dominates submitting a large sweep. Jobs that
    differ from an already composed one only in plain `key=value` overrides (no config group,
    no `+`/`~`, no `hydra.*`) reuse it: copy, apply those values, and update the bookkeeping
    Hydra derives from overrides. A test checks the result equals a full composition.
    """

    def __init__(self, launcher):
        self.launcher = launcher
        self.loader = launcher.hydra_context.config_loader
        self.groups = self._all_groups("")
        self.cache: dict[tuple, DictConfig] = {}

    def _all_groups(self, parent: str) -> set[str]:
        found = set()
        for group in self.loader.list_groups(parent):
            full = f"{parent}/{group}" if parent else group
            found |= {full} | self._all_groups(full)
        return found

    def _is_plain_value(self, override) -> bool:
        key = override.key_or_group
        return (
            override.is_force_add() is False
            and not override.is_add()
            and not override.is_delete()
            and not override.is_hydra_override()
            and key.replace(".", "/") not in self.groups
            and override.package is None
        )

    def compose(
        self, overrides: list[str], job_num: int, cluster: ClusterConfig, sweep_dir: str
    ) -> DictConfig:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from lingua_sweep.train import preflight

        where = f"job #{job_num} ({' '.join(overrides)})"
        extra = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "cluster"]
        extra += [f"cluster={cluster.name}", f"hydra.sweep.dir={sweep_dir}"]
        try:
            parsed = OverridesParser.create().parse_overrides(extra)
            values = [o for o in parsed if self._is_plain_value(o)]
            key = (
                tuple(o.input_line for o in parsed if o not in values),
                tuple(o.key_or_group for o in values),
            )
            base = self.cache.get(key)
            if base is None:
                config = self.loader.load_sweep_config(self.launcher.config, extra)
                self.cache[key] = config
            else:
                config = copy.deepcopy(base)
                with open_dict(config):
                    ConfigLoaderImpl._apply_overrides_to_config(values, config)
                    config.hydra.overrides.task = [
                        o.input_line for o in parsed if not o.is_hydra_override()
                    ]
                    dirname = config.hydra.job.config.override_dirname
                    config.hydra.job.override_dirname = get_overrides_dirname(
                        overrides=[o for o in parsed if not o.is_hydra_override()],
                        kv_sep=dirname.kv_sep,
                        item_sep=dirname.item_sep,
                        exclude_keys=list(dirname.exclude_keys),
                    )
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors have many types
            raise UserError(f"{where}: {e}") from e
        config = copy.deepcopy(config)
        with open_dict(config.hydra.job):
            config.hydra.job.num = job_num
        try:
            # The root is typed by the `train_schema` default, so types are already checked.
            preflight(config)
        except UserError as e:
            raise UserError(f"{where}: {e}") from e
        return config


def remote_sweep_dir(cluster: ClusterConfig, name: str, local_sweep_dir: Path) -> str:
    return f"{cluster.output_root.rstrip('/')}/{name}/multirun/{local_sweep_dir.name}"


# --- submission backends --------------------------------------------------------------------


def sbatch_params(cluster: ClusterConfig, p: LauncherParams, job_name: str) -> dict[str, Any]:
    gpus = cluster.gpus_per_node if p.gpus_per_node is None else p.gpus_per_node
    return {
        "job_name": job_name,
        "partition": cluster.partition,
        "account": cluster.account,
        "qos": cluster.qos,
        "nodes": p.nodes,
        "gpus_per_node": gpus or None,
        "ntasks_per_node": p.tasks_per_node or max(gpus, 1),
        "cpus_per_task": p.cpus_per_task,
        "mem": f"{p.mem_gb}GB" if p.mem_gb else None,
        "time": p.timeout_min,
        "signal_delay_s": p.signal_delay_s,
        "exclude": ",".join(cluster.exclude) or None,
        "setup": [*cluster.setup, *p.setup] or None,
        "additional_parameters": dict(p.additional_parameters) or None,
        "max_num_timeout": p.max_num_timeout,
    }


@contextlib.contextmanager
def cluster_environ(cluster: ClusterConfig):
    """The cluster's environment (e.g. SLURM_CONF) for submitit's sbatch/sacct subprocesses."""
    saved = {k: os.environ.get(k) for k in cluster.env}
    os.environ.update(cluster.env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class InProcessBackend:
    """A cluster whose Slurm answers here (or the `local` cluster): submitit in this process."""

    def __init__(self, cluster: ClusterConfig, folder: str, params: dict[str, Any]):
        self.cluster, self.folder, self.params = cluster, folder, params
        self.jobs: dict[str, Any] = {}

    def submit(self, tasks: list[agent.JobTask]) -> list[str]:
        with cluster_environ(self.cluster):
            jobs = agent.submit(
                tasks, folder=self.folder, params=self.params, slurm=self.cluster.slurm
            )
        self.jobs.update({str(j.job_id): j for j in jobs})
        return [str(j.job_id) for j in jobs]

    def states(self, ids: list[str]) -> dict[str, str]:
        if not self.cluster.slurm:
            return {i: "FINISHED" if self.jobs[i].done() else "RUNNING" for i in ids}
        with cluster_environ(self.cluster):
            return {i: agent.job_state(self.jobs[i]) for i in ids}

    def outcomes(self, ids: list[str]) -> dict[str, tuple[str, Any]]:
        with cluster_environ(self.cluster):
            return {i: agent.job_outcome(self.jobs[i]) for i in ids}

    def fetch_outputs(self, remote_dir: str, local_dir: Path) -> None:
        pass  # outputs are already on this filesystem

    def cancel(self, ids: list[str]) -> None:
        with cluster_environ(self.cluster):
            for i in ids:
                self.jobs[i].cancel(check=False)


class SshBackend:
    """A remote cluster: code rsynced to the login node, the agent run there over ssh."""

    def __init__(
        self, cluster: ClusterConfig, folder: str, params: dict[str, Any], timeout_s: float
    ):
        self.cluster, self.folder, self.params, self.timeout = cluster, folder, params, timeout_s
        self.code_dir = cluster.remote_code_dir
        remote.sync_code(
            REPO_ROOT,
            cluster.login,
            self.code_dir,
            ssh_options=cluster.ssh_options,
            timeout=timeout_s,
        )

    def _agent(self, args: list[str], stdin: bytes | None = None) -> str:
        setup = "".join(f"{line} && " for line in self.cluster.setup)
        command = (
            f"cd {shlex.quote(self.code_dir)} && {setup}"
            f"{self.cluster.python} -m lingua_sweep.agent {shlex.join(args)}"
        )
        result = remote.run(
            ["bash", "-lc", command],
            login=self.cluster.login,
            ssh_options=self.cluster.ssh_options,
            timeout=self.timeout,
            input=stdin,
        )
        return result.stdout if isinstance(result.stdout, str) else result.stdout.decode()

    def submit(self, tasks: list[agent.JobTask]) -> list[str]:
        blob = base64.b64encode(cloudpickle.dumps(tasks))
        out = self._agent(
            ["submit", "--folder", self.folder, "--params", json.dumps(self.params)], stdin=blob
        )
        return json.loads(out.strip().splitlines()[-1])

    def states(self, ids: list[str]) -> dict[str, str]:
        out = self._agent(["states", "--folder", self.folder, "--jobs", ",".join(ids)])
        return json.loads(out.strip().splitlines()[-1])

    def outcomes(self, ids: list[str]) -> dict[str, tuple[str, Any]]:
        out = self._agent(["results", "--folder", self.folder, "--jobs", ",".join(ids)])
        return cloudpickle.loads(base64.b64decode(out.strip().splitlines()[-1]))

    def fetch_outputs(self, remote_dir: str, local_dir: Path) -> None:
        """Brings a job's small outputs home (metrics, configs, status), not its checkpoints."""
        remote.fetch_dir(
            self.cluster.login,
            remote_dir,
            local_dir,
            ssh_options=self.cluster.ssh_options,
            timeout=self.timeout,
            exclude=["checkpoints", ".submitit"],
        )

    def cancel(self, ids: list[str]) -> None:
        self._agent(["cancel", "--jobs", ",".join(ids)])


# --- the launch -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class Job:
    index: int
    overrides: list[str]
    cluster: str
    config: DictConfig
    local_dir: Path
    remote_dir: str | None
    job_id: str | None = None
    done: bool = False
    result: JobReturn | None = None


def launch(launcher, p: LauncherParams, job_overrides, initial_job_idx: int) -> list[JobReturn]:
    cfg = launcher.config
    sweep_dir = Path(str(cfg.hydra.sweep.dir))
    registry = clusters.load_clusters(_searchpath_dirs(cfg))
    names = _cluster_names(p, registry)
    here = cfg.cluster.name
    if p.when_busy not in WHEN_BUSY:
        raise UserError(f"hydra.launcher.when_busy={p.when_busy!r}: choose one of {WHEN_BUSY}")

    statuses = clusters.probe([registry[n] for n in names], timeout_s=p.probe_timeout_s)
    assignment = plan(len(job_overrides), statuses, registry, p)

    composer = JobComposer(launcher)
    jobs: list[Job] = []
    for offset, (overrides, name) in enumerate(zip(job_overrides, assignment, strict=True)):
        index = initial_job_idx + offset
        cluster = registry[name]
        remote_dir = None
        job_sweep_dir = str(sweep_dir.resolve())
        if not _is_local(cluster, registry.get(here)):
            remote_dir = remote_sweep_dir(cluster, str(cfg.name), sweep_dir)
            job_sweep_dir = remote_dir
        config = composer.compose(list(overrides), index, cluster, job_sweep_dir)
        jobs.append(
            Job(
                index=index,
                overrides=list(overrides),
                cluster=name,
                config=config,
                local_dir=sweep_dir / str(index),
                remote_dir=f"{remote_dir}/{index}" if remote_dir else None,
            )
        )
    print_plan(statuses, assignment, job_overrides, registry)
    if p.dry_run:
        log.info("dry run: nothing submitted")
        raise SystemExit(0)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    backends = {}
    try:
        for name in dict.fromkeys(assignment):
            share = [j for j in jobs if j.cluster == name]
            backends[name] = _submit_share(launcher, registry[name], share, p, sweep_dir)
        _wait(jobs, backends, p)
    except KeyboardInterrupt:
        _cancel_all(jobs, backends)
        raise
    return [j.result for j in jobs]


def _searchpath_dirs(cfg: DictConfig) -> list[Path]:
    dirs = []
    for entry in cfg.hydra.searchpath or []:
        entry = str(entry)
        if entry.startswith("file://"):
            dirs.append(Path(entry[len("file://") :]))
    return dirs


def _cluster_names(p: LauncherParams, registry: dict[str, ClusterConfig]) -> list[str]:
    wanted = [p.cluster] if p.cluster else (p.clusters or list(registry))
    unknown = [n for n in wanted if n not in registry]
    if unknown:
        raise UserError(f"unknown cluster(s) {unknown} in hydra.launcher; known: {list(registry)}")
    return sorted(wanted, key=lambda n: registry[n].priority)


def _is_local(cluster: ClusterConfig, here: ClusterConfig | None) -> bool:
    """Submit in-process when the cluster's Slurm answers here (same login node) or no Slurm."""
    if not cluster.slurm or cluster.login is None:
        return True
    return here is not None and here.login == cluster.login and here.slurm


def _submit_share(
    launcher, cluster: ClusterConfig, share: list[Job], p: LauncherParams, sweep_dir: Path
):
    name = str(launcher.config.name)
    base = share[0].remote_dir.rsplit("/", 1)[0] if share[0].remote_dir else str(sweep_dir)
    folder = f"{base}/.submitit/%j"
    params = sbatch_params(cluster, p, job_name=f"{name}_{cluster.name}")
    if share[0].remote_dir is None:
        backend = InProcessBackend(cluster, folder, params)
    else:
        backend = SshBackend(cluster, folder, params, timeout_s=p.remote_timeout_s)
    tasks = [
        agent.JobTask(task_function=launcher.task_function, config=j.config, job_num=j.index)
        for j in share
    ]
    # The local cluster runs jobs as processes on this machine: a few at a time.
    waves = (
        [tasks]
        if cluster.slurm
        else [
            tasks[i : i + max(p.local_parallel, 1)]
            for i in range(0, len(tasks), max(p.local_parallel, 1))
        ]
    )
    pending = list(share)
    for wave in waves:
        ids = backend.submit(wave)
        for job, job_id in zip(pending, ids, strict=False):
            job.job_id = job_id
            log.info("#%d -> %s job %s", job.index, cluster.name, job_id)
        pending = pending[len(ids) :]
        if not cluster.slurm and pending:
            _wait([j for j in share if j.job_id in ids], {cluster.name: backend}, p)
    return backend


def _wait(jobs: list[Job], backends: dict, p: LauncherParams) -> None:
    while True:
        open_jobs = [j for j in jobs if not j.done and j.job_id is not None]
        if not open_jobs:
            return
        for name, backend in backends.items():
            mine = [j for j in open_jobs if j.cluster == name]
            if not mine:
                continue
            states = backend.states([j.job_id for j in mine])
            finished = [j for j in mine if states.get(j.job_id) in agent.FINISHED_STATES]
            if finished:
                outcomes = backend.outcomes([j.job_id for j in finished])
                for j in finished:
                    _finish(j, outcomes[j.job_id], backend)
        if any(not j.done for j in jobs if j.job_id is not None):
            time.sleep(p.poll_interval_s)


def _finish(job: Job, outcome: tuple[str, Any], backend) -> None:
    kind, value = outcome
    if job.remote_dir is not None:
        try:
            backend.fetch_outputs(job.remote_dir, job.local_dir)
        except remote.RemoteError as e:
            log.warning("#%d: could not fetch outputs from %s: %s", job.index, job.cluster, e)
    if kind == "ok":
        job.result = value
    else:
        # The job died without a result (killed, node failure, cancelled): say so everywhere.
        agent.write_status(
            job.local_dir,
            status="FAILED",
            error=str(value).splitlines()[0],
            job_id=job.job_id,
            cluster=job.cluster,
        )
        job.result = JobReturn(
            overrides=job.overrides,
            cfg=job.config,
            status=JobStatus.FAILED,
            _return_value=RuntimeError(str(value)),
        )
    if job.result.status == JobStatus.FAILED:
        log.error(
            "#%d on %s (job %s) FAILED: %s",
            job.index,
            job.cluster,
            job.job_id,
            str(job.result._return_value).splitlines()[0],
        )
    job.done = True


def _cancel_all(jobs: list[Job], backends: dict) -> None:
    for name, backend in backends.items():
        ids = [j.job_id for j in jobs if j.cluster == name and j.job_id and not j.done]
        if ids:
            try:
                backend.cancel(ids)
                log.warning("cancelled %s jobs on %s: %s", len(ids), name, ", ".join(ids))
            except remote.RemoteError as e:
                log.error("could not cancel %s on %s: %s", ids, name, e)
