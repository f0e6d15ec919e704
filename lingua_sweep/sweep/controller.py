"""The sweep's loop: probe -> dispatch -> submit -> poll -> record, until every job is final.

Every step writes to the journal before it acts, so the loop can stop anywhere (`kill -9`, a
laptop closing) and a new controller picks the sweep up from the journal alone:
- a submission is recorded as an *intent* (its Slurm job name) before sbatch and resolved by
  that name afterwards (`find`), so a job is never submitted twice nor lost in between;
- a cluster that does not answer (ssh, sacct) is retried with backoff; its jobs keep their
  journal entries and are collected when it answers again;
- a result is read only once Slurm says the job is final, in the same call that polls it.
"""

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton

from lingua_sweep import clusters as cluster_lib
from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError
from lingua_sweep.sweep import agent, dispatch, remote
from lingua_sweep.sweep import journal as journal_lib
from lingua_sweep.sweep.backends import Backend, make_backend
from lingua_sweep.sweep.compose import (
    JobComposer,
    config_hash,
    is_trainer_config,
    remote_sweep_dir,
)
from lingua_sweep.sweep.header import project_root, sweep_header
from lingua_sweep.sweep.journal import QUEUED, SUBMITTING, JobEntry, Journal
from lingua_sweep.sweep.params import WHEN_BUSY, LauncherParams

log = logging.getLogger(__name__)
MAX_SUBMIT_FAILURES = 3
BACKOFF_MAX_S = 60.0
# Slurm states that mean "not started yet" for moving and for counting a cluster's queue.
WAITING = ("PENDING", "CONFIGURING", "UNKNOWN", SUBMITTING)


@dataclass
class Link:
    """A cluster as the controller sees it: its backend, its last probe, whether it answers."""

    config: ClusterConfig
    backend: Backend
    status: cluster_lib.ClusterStatus | None = None
    unusable: str | None = None  # a reason this sweep cannot use it at all (its data is missing)
    down_until: float = 0.0
    failures: int = 0
    reason: str | None = None  # why it is down, for the live view and status

    def down(self, reason: str, poll_s: float) -> None:
        self.failures += 1
        self.reason = reason
        self.down_until = time.monotonic() + min(BACKOFF_MAX_S, poll_s * 2**self.failures)

    def up(self) -> None:
        self.failures, self.reason, self.down_until = 0, None, 0.0

    @property
    def available(self) -> bool:
        return self.unusable is None and time.monotonic() >= self.down_until


class Controller:
    def __init__(
        self,
        *,
        sweep_dir: Path,
        params: LauncherParams,
        registry: dict[str, ClusterConfig],
        here: ClusterConfig | None,
        task_function: Callable | None = None,
        composer: JobComposer | None = None,
        code_root: Path | None = None,
        monitor=None,
    ):
        if params.when_busy not in WHEN_BUSY:
            raise UserError(
                f"hydra.launcher.when_busy={params.when_busy!r}: choose one of {WHEN_BUSY}"
            )
        self.sweep_dir = sweep_dir.resolve()
        self.p = params
        self.registry = registry
        self.names = candidate_clusters(params, registry)
        self.here = here
        self.task_function = task_function
        self.composer = composer
        self.code_root = code_root or (project_root(task_function) if task_function else None)
        self.journal = Journal(self.sweep_dir)
        self.state = self.journal.replay()
        self.links = {
            n: Link(
                config=registry[n],
                backend=make_backend(
                    registry[n],
                    here=here,
                    code_root=self.code_root or Path.cwd(),
                    timeout_s=params.remote_timeout_s,
                ),  # fmt: skip
            )
            for n in self.names
        }
        self.monitor = monitor
        self.configs: dict[int, Any] = {}  # job index -> composed config, this process only
        self.composed_for: dict[int, tuple] = {}  # job index -> (cluster, sweep dir) of configs
        self.metrics: dict[int, str] = {}  # job index -> metrics.jsonl text of a running job
        self.returns: dict[int, Any] = {}  # job index -> Hydra's JobReturn, as the job made it
        self.on_result: Callable[[JobEntry], None] | None = None
        self.want_metrics = False
        self.last_probe = -1e9
        self.submit_failures: dict[int, int] = {}
        self.data_checked: dict[tuple, str | None] = {}
        self.submitted_any = any(j.job_id for j in self.state.jobs.values())

    # --- opening a sweep ------------------------------------------------------------------

    def open(self, header: dict[str, Any] | None = None) -> None:
        """Takes the sweep's lock; writes its header (new sweep) or a `resumed` record."""
        self.journal.lock()
        self.state = self.journal.replay()
        if self.state.header:
            self.journal.append("resumed", pid=os.getpid(), host=socket.gethostname())
            return
        record = self.journal.append("sweep", **(header or {}), **sweep_header(self))
        self.state.header = record

    def close(self) -> None:
        self.journal.unlock()

    @property
    def sweep_id(self) -> str:
        return self.state.header.get("id", "sweep")

    def register(
        self, job_overrides: Iterable[list[str]], first_index: int, trials: list | None = None
    ) -> list[int]:
        """Composes and validates every job, then records the new ones; nothing is submitted.

        A job already in the journal must be the same job (same config hash): a rerun with
        other overrides under the same sweep dir would silently mix two sweeps.
        """
        assert self.composer is not None
        first = self.registry[self.names[0]] if self.names else None
        new = []
        indices = []
        for offset, overrides in enumerate(job_overrides):
            index = first_index + offset
            overrides = list(overrides)
            config = self.composer.compose(overrides, index, first, str(self.sweep_dir))
            self.configs[index] = config
            self.composed_for[index] = (first.name if first else None, str(self.sweep_dir))
            digest = config_hash(config)
            known = self.state.jobs.get(index)
            if known is not None and known.config_hash != digest:
                raise UserError(
                    f"job #{index} ({' '.join(overrides)}) is not the job this sweep ran as "
                    f"#{index} ({' '.join(known.overrides)}): its config changed since; rerun "
                    f"with a new hydra.sweep.dir, or restore the code/overrides of {self.sweep_dir}"
                )
            if known is None:
                trial = trials[offset] if trials else None
                new.append({"index": index, "overrides": overrides, "config_hash": digest,
                            "trial": trial})  # fmt: skip
            indices.append(index)
        for record in self.journal.append_many([("job", r) for r in new]):
            journal_lib.apply(self.state, record)
        return indices

    # --- the loop -------------------------------------------------------------------------

    def run(self, indices: list[int] | None = None) -> None:
        """Cycles until the given jobs (all, by default) are final, or submitted with detach."""
        wanted = set(self.state.jobs) if indices is None else set(indices)
        while True:
            self.cycle()
            jobs = [self.state.jobs[i] for i in wanted]
            if all(j.final for j in jobs):
                return
            if self.p.detach and all(j.state not in (QUEUED, SUBMITTING) for j in jobs):
                return
            time.sleep(self.p.poll_interval_s)

    def cycle(self) -> None:
        if self.journal.changed_by_others():
            self.state = self.journal.replay()
        self._check_cancel_request()
        self._resolve_intents()
        self._dispatch()
        self._poll()
        self._move_long_pending()
        if self.monitor is not None:
            self.monitor.update(self)

    def jobs(self, *states: str) -> list[JobEntry]:
        return [j for j in self.state.jobs.values() if not states or j.state in states]

    def open_jobs(self) -> list[JobEntry]:
        return [j for j in self.state.jobs.values() if j.job_id and not j.final]

    def _record(self, kind: str, **fields) -> None:
        """Writes a record, then applies it: memory never runs ahead of the journal."""
        journal_lib.apply(self.state, self.journal.append(kind, **fields))

    # --- submissions that may or may not have happened ------------------------------------

    def _resolve_intents(self) -> None:
        for batch, intent in list(self.state.intents.items()):
            link = self.links.get(intent["cluster"])
            if link is None or not link.available:
                continue
            try:
                ids = link.backend.find(batch)
            except remote.RemoteError as e:
                link.down(e.reason, self.p.poll_interval_s)
                continue
            indices = intent["indices"]
            if ids:
                log.info("found submission %s on %s: %s", batch, intent["cluster"], ids)
                self._record(
                    "submitted", batch=batch, cluster=intent["cluster"], folder=intent["folder"],
                    tasks=intent["tasks"], remote_dirs=intent.get("remote_dirs"),
                    job_ids={str(i): job_id for i, job_id in zip(indices, ids, strict=False)},
                )  # fmt: skip
                # Ids missing from a partial submission: those jobs go back to the queue.
                lost = indices[len(ids) :]
                if lost:
                    self._record("unsubmitted", batch=batch, indices=lost, reason="not found")
            else:
                self._record("unsubmitted", batch=batch, indices=indices,
                             reason=intent.get("error") or "never reached Slurm")  # fmt: skip

    # --- dispatching ----------------------------------------------------------------------

    def _probe(self) -> None:
        if time.monotonic() - self.last_probe < self.p.probe_every_s:
            return
        links = [link for link in self.links.values() if link.available]
        statuses = cluster_lib.probe([link.config for link in links], self.p.probe_timeout_s)
        for link, status in zip(links, statuses, strict=True):
            link.status = status
        self.last_probe = time.monotonic()

    def rooms(self) -> dict[str, int]:
        """Jobs each cluster can start now, minus ours already waiting in its queue."""
        out = {}
        for name, link in self.links.items():
            c = link.config
            if not link.available or link.status is None:
                continue
            if not c.slurm:
                running = [j for j in self.open_jobs() if j.cluster == name]
                out[name] = max(self.p.local_parallel, 1) - len(running)
                continue
            shape = dispatch.job_shape(c, self.p)
            waiting = [j for j in self.open_jobs() + self.jobs(SUBMITTING)
                       if j.cluster == name and j.state in WAITING]  # fmt: skip
            out[name] = max(0, dispatch.room(link.status, c, shape) - len(waiting))
        return out

    def _reachable_slurm(self) -> list[str]:
        return [
            n for n, link in self.links.items()
            if link.config.slurm and link.available and link.status is not None
            and link.status.state in ("idle", "busy")
            and dispatch.job_shape(link.config, self.p).nodes <= link.config.max_nodes
        ]  # fmt: skip

    def _dispatch(self) -> None:
        queued = sorted(self.jobs(QUEUED), key=lambda j: j.index)
        if not queued or self.composer is None or self.state.cancel_requested:
            return
        unusable = [link.unusable for link in self.links.values() if link.unusable]
        if len(unusable) == len(self.links):
            raise UserError(unusable[0])
        self._probe()
        rooms = self.rooms()
        reachable = self._reachable_slurm()
        order = [n for n in self.names if n in rooms and (self.registry[n].slurm or not reachable)]
        queue_on = reachable[0] if reachable else None
        if not reachable and not any(not self.registry[n].slurm for n in order):
            if not self.submitted_any:
                statuses = [link.status for link in self.links.values() if link.status]
                reasons = "; ".join(f"{s.name}: {s.reason or s.state}" for s in statuses)
                raise UserError(
                    f"no cluster can take the sweep ({reasons}); check `lingua-sweep clusters`"
                )
            return  # every cluster is away for now: the jobs wait for one to come back
        targets = dispatch.assign(
            len(queued), rooms, order, queue_on=queue_on, when_busy=self.p.when_busy
        )
        if not self.submitted_any:
            dispatch.check_when_busy(targets.count(None), len(queued), reachable, self.p.when_busy)
        for name in dict.fromkeys(t for t in targets if t):
            share = [j for j, t in zip(queued, targets, strict=True) if t == name]
            if self.registry[name].slurm:
                self._submit(self.links[name], share)
            else:  # one process each: a kill between two of them loses nothing
                for job in share:
                    self._submit(self.links[name], [job])

    def _submit(self, link: Link, share: list[JobEntry]) -> None:
        c = link.config
        try:
            link.backend.prepare()
        except remote.RemoteError as e:
            log.warning("cluster %s: cannot prepare its code: %s", c.name, e.reason)
            link.down(e.reason, self.p.poll_interval_s)
            return
        local = link.backend.code == {}
        recorded = any(r["kind"] == "code" and r["cluster"] == c.name for r in self.state.extra)
        if not local and not recorded:
            self._record("code", cluster=c.name, **link.backend.code)
        name = self.state.header.get("name") or "sweep"
        if local:
            base = str(self.sweep_dir)
        else:
            base = remote_sweep_dir(c, name, self.sweep_dir, self.sweep_id)
        singletons = Singleton.get_state()
        tasks, remote_dirs = [], {}
        for job in share:
            if self.composed_for.get(job.index) == (c.name, base):
                config = self.configs[job.index]  # composed for this very cluster at register
            else:
                config = self.composer.compose(job.overrides, job.index, c, base)
                self.composed_for[job.index] = (c.name, base)
            if is_trainer_config(config) and self.code_version:
                config.code_version = self.code_version
            problem = self._data_problem(link, config)
            if problem:
                log.error("cluster %s cannot run this sweep: %s", c.name, problem)
                link.unusable = problem
                return  # its jobs stay queued for the other clusters
            self.configs[job.index] = config
            tasks.append(agent.JobTask(task_function=self.task_function, config=config,
                                       job_num=job.index, cluster=c.name,
                                       singletons=singletons))  # fmt: skip
            if not local:
                remote_dirs[str(job.index)] = f"{base}/{job.index}"
        shape = dispatch.job_shape(c, self.p)
        batch = f"{name}.{self.sweep_id}.{len(self.journal.records())}"
        folder = f"{base}/.submitit/%j"
        params = dispatch.sbatch_params(c, self.p, job_name=batch)
        indices = [j.index for j in share]
        self._record("intent", batch=batch, cluster=c.name, indices=indices, folder=folder,
                     tasks=shape.tasks, remote_dirs=remote_dirs or None)  # fmt: skip
        try:
            ids = link.backend.submit(tasks, folder=folder, params=params)
        except remote.RemoteError as e:
            # sbatch may or may not have run: the intent is resolved by its name next cycle.
            log.warning("cluster %s: submission of %s unconfirmed: %s", c.name, batch, e.reason)
            link.down(e.reason, self.p.poll_interval_s)
            return
        except Exception as e:  # noqa: BLE001 - sbatch refused (submitit raises several kinds)
            reason = agent.last_line(str(e)) or type(e).__name__
            log.error("cluster %s refused %s: %s", c.name, batch, reason)
            self._record("unsubmitted", batch=batch, indices=indices, reason=reason)
            for job in share:
                self.submit_failures[job.index] = self.submit_failures.get(job.index, 0) + 1
                if self.submit_failures[job.index] >= MAX_SUBMIT_FAILURES:
                    self._finish(job, {"status": "FAILED", "error": f"sbatch: {reason}"}, link)
            return
        self._record(
            "submitted",
            batch=batch,
            cluster=c.name,
            folder=folder,
            tasks=shape.tasks,
            remote_dirs=remote_dirs or None,
            job_ids={str(i): job_id for i, job_id in zip(indices, ids, strict=True)},
        )
        self.submitted_any = True
        for index, job_id in zip(indices, ids, strict=True):
            log.info("#%d -> %s job %s", index, c.name, job_id)

    @property
    def code_version(self) -> str | None:
        code = self.state.header.get("code", {})
        if not code.get("commit"):
            return None
        return code["commit"][:12] + ("-dirty" if code.get("dirty") else "")

    def _data_problem(self, link: Link, config) -> str | None:
        """The trainer's data must exist where the job will run, before anything is submitted:
        checked here for this machine's filesystem, by the agent on a login node."""
        c = link.config
        if not is_trainer_config(config) or not c.data_on_login_node:
            return None
        key = (c.name, config.data.root, config.data.train_files, config.data.val_file)
        if key in self.data_checked:
            return self.data_checked[key]
        problem = None
        if link.backend.code == {}:  # this machine's filesystem
            from lingua_sweep.data import check_data_files

            try:
                check_data_files(config.data, cluster=c.name)
            except UserError as e:
                problem = str(e)
        else:
            root = str(config.data.root)
            patterns = [f"{root}/{config.data.train_files}", f"{root}/{config.data.val_file}"]
            try:
                missing = link.backend.missing(patterns)
            except remote.RemoteError:
                return None  # unknown now; the job itself checks when it starts
            if missing:
                problem = (
                    f"{missing[0]} does not exist on {c.name}'s login node (data.root={root} "
                    f"from cluster {c.name}); copy the data there or set data.root"
                )
        self.data_checked[key] = problem
        return problem

    # --- watching -------------------------------------------------------------------------

    def _poll(self) -> None:
        for name, link in self.links.items():
            mine = [j for j in self.open_jobs() if j.cluster == name]
            if not mine or not link.available:
                continue
            files = []
            if self.want_metrics:
                files = [self._metrics_path(j) for j in mine if j.state == "RUNNING"]
            request = {
                "jobs": [{"id": j.job_id, "folder": j.folder, "tasks": j.tasks} for j in mine],
                "files": files,
            }
            try:
                reply = link.backend.poll(request)
            except remote.RemoteError as e:
                if link.failures == 0:
                    log.warning("cluster %s does not answer (%s); retrying", name, e.reason)
                link.down(e.reason, self.p.poll_interval_s)
                continue
            if link.failures:
                log.info("cluster %s answers again", name)
            link.up()
            for job in mine:
                outcome = reply["outcomes"].get(job.job_id)
                if outcome is not None:
                    self._finish(job, outcome, link)
                    continue
                state = reply["states"].get(job.job_id, {}).get("state", "UNKNOWN")
                state = {"COMPLETING": "RUNNING", "CONFIGURING": "PENDING"}.get(state, state)
                if state != job.state and not (state == "UNKNOWN" and job.state != SUBMITTING):
                    reason = reply["states"][job.job_id].get("reason") or None
                    self._record("state", index=job.index, state=state, reason=reason)
                text = reply["files"].get(self._metrics_path(job)) if files else None
                if text:
                    self.metrics[job.index] = text

    def _metrics_path(self, job: JobEntry) -> str:
        base = job.remote_dir or str(self.sweep_dir / str(job.index))
        return f"{base}/metrics.jsonl"

    def _finish(self, job: JobEntry, outcome: dict[str, Any], link: Link) -> None:
        local_dir = self.sweep_dir / str(job.index)
        if job.remote_dir:
            try:
                link.backend.fetch(job.remote_dir, local_dir)
            except remote.RemoteError as e:
                log.warning("#%d: could not fetch outputs from %s: %s", job.index, job.cluster,
                            e.reason)  # fmt: skip
        status = outcome["status"]
        if outcome.get("job_return") is not None:
            self.returns[job.index] = outcome["job_return"]
        value, pickled = journal_lib.encode_value(outcome.get("value"))
        agent.write_status(local_dir, status=status, error=outcome.get("error"),
                           job_id=job.job_id, cluster=job.cluster)  # fmt: skip
        self._record("result", index=job.index, status=status, value=value,
                     value_pickle=pickled, error=outcome.get("error"),
                     step=outcome.get("step"))  # fmt: skip
        if status == "FAILED":
            log.error("#%d on %s (job %s) FAILED: %s", job.index, job.cluster, job.job_id,
                      outcome.get("error"))  # fmt: skip
        if self.on_result is not None:
            self.on_result(self.state.jobs[job.index])

    def _move_long_pending(self) -> None:
        if self.p.max_pending_s is None or self.composer is None:
            return
        now = time.time()
        stuck = [
            j for j in self.jobs("PENDING")
            if j.started_at is None and j.moves == 0 and j.submitted_at
            and now - j.submitted_at >= self.p.max_pending_s
        ]  # fmt: skip
        if not stuck:
            return
        self._probe()
        rooms = self.rooms()
        for job in stuck:
            others = {n: r for n, r in rooms.items() if n != job.cluster and self.registry[n].slurm}
            if not dispatch.should_move(now - job.submitted_at, job.moves, self.p.max_pending_s,
                                        others):  # fmt: skip
                continue
            link = self.links[job.cluster]
            try:
                link.backend.cancel([job.job_id])
            except remote.RemoteError as e:
                link.down(e.reason, self.p.poll_interval_s)
                continue
            target = next(n for n, r in others.items() if r > 0)
            rooms[target] -= 1
            log.info("#%d pending %.0fs on %s while %s has room: moving it", job.index,
                     now - job.submitted_at, job.cluster, target)  # fmt: skip
            self._record(
                "moved",
                index=job.index,
                cluster=job.cluster,
                job_id=job.job_id,
                to=target,
                reason=f"pending {now - job.submitted_at:.0f}s",
            )

    # --- cancelling -----------------------------------------------------------------------

    def _check_cancel_request(self) -> None:
        if self.state.cancel_requested and any(not j.final for j in self.state.jobs.values()):
            self.cancel_all("cancelled by `lingua-sweep cancel`")

    def cancel_all(self, reason: str = "cancelled") -> list[str]:
        """Cancels every job not yet final; returns what could not be cancelled (and why)."""
        if not self.state.cancel_requested:
            self._record("cancel", reason=reason)
        self._resolve_intents()
        problems = []
        for name, link in self.links.items():
            mine = [j for j in self.open_jobs() if j.cluster == name]
            if not mine:
                continue
            try:
                link.backend.cancel([j.job_id for j in mine])
            except remote.RemoteError as e:
                problems.append(f"{name}: {e.reason}")
                continue
            for job in mine:
                self._record("result", index=job.index, status="CANCELLED", error=reason)
        for job in self.jobs(QUEUED):
            self._record("result", index=job.index, status="CANCELLED", error=reason)
        return problems

    def cancel_job(self, index: int, status: str, note: str, *, step: int | None = None) -> None:
        """Stops one job (a pruned trial) and records why and at which step; it ends as
        `status`, with its outputs brought home like a finished job's."""
        job = self.state.jobs[index]
        if job.final:
            return
        link = self.links.get(job.cluster) if job.cluster else None
        if job.job_id and link is not None:
            try:
                link.backend.cancel([job.job_id])
            except remote.RemoteError as e:
                log.warning("#%d: could not cancel on %s: %s", index, job.cluster, e.reason)
        self._record("result", index=index, status=status, error=note, step=step)
        local_dir = self.sweep_dir / str(index)
        if job.remote_dir and link is not None:
            try:
                link.backend.fetch(job.remote_dir, local_dir)
            except remote.RemoteError as e:
                log.warning("#%d: could not fetch outputs: %s", index, e.reason)
        agent.write_status(local_dir, status=status, error=note, step=step)


def candidate_clusters(p: LauncherParams, registry: dict[str, ClusterConfig]) -> list[str]:
    """The clusters a sweep may use, in priority order; an unknown name is a user error."""
    wanted = [p.cluster] if p.cluster else (p.clusters or list(registry))
    unknown = [n for n in wanted if n not in registry]
    if unknown:
        raise UserError(
            f"unknown cluster(s) {unknown} in hydra.launcher; known: {', '.join(registry)}"
        )
    return sorted(wanted, key=lambda n: (registry[n].priority, n))
