"""The sweep's loop: probe -> dispatch -> submit -> poll -> record, until every job is final.

Every step writes to the journal before it acts, so the loop can stop anywhere (`kill -9`, a
laptop closing) and a new controller picks the sweep up from the journal alone:
- a submission is an *intent* (its Slurm job name) journaled before a fenced sbatch, settled by
  the ids or by the agent's `resolve` (submit.py): a job is never submitted twice nor lost;
- a cancel, a prune or a move is a `stop` request, final only once Slurm says the job ended;
  until then it is asked again each poll, also by a resumed launcher;
- a Slurm job carrying this sweep's name that the journal has no place for (a stray) is
  journaled and cancelled;
- each cluster's calls run on a worker thread of its own, with deadlines: a slow or hung
  cluster never stalls another's polling and dispatch; the journal is written here only.
"""

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError
from lingua_sweep.sweep import clock, faultpoint, layout
from lingua_sweep.sweep import journal as journal_lib
from lingua_sweep.sweep.backends import make_backend
from lingua_sweep.sweep.compose import JobComposer, JobConfig, is_trainer_config
from lingua_sweep.sweep.dispatch import Dispatcher
from lingua_sweep.sweep.header import project_root, sweep_header
from lingua_sweep.sweep.journal import QUEUED, SUBMITTING, JobEntry, Journal
from lingua_sweep.sweep.link import Link
from lingua_sweep.sweep.params import PLACEMENTS, WHEN_BUSY, LauncherParams
from lingua_sweep.sweep.shape import job_shape
from lingua_sweep.sweep.submit import Submitter
from lingua_sweep.sweep.tails import Tail
from lingua_sweep.sweep.watch import Watcher

log = logging.getLogger(__name__)
BACKOFF_MAX_S = 60.0
# Written at a sweep's start besides the journal: Hydra's record of the command, the study.
REFUSED_SWEEP_FILES = ("multirun.yaml", "optuna.db")
CONFIRM_CANCEL_S = 30.0  # how long a cancel waits for Slurm to confirm before saying so


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
        if params.placement not in PLACEMENTS:
            raise UserError(
                f"hydra.launcher.placement={params.placement!r}: choose one of {PLACEMENTS}"
            )
        self.sweep_dir = sweep_dir.resolve()
        self.p = params
        self.registry = registry
        self.names = candidate_clusters(params, registry)
        self.here = here
        self.task_function = task_function
        self.composer = composer
        self.code_root = code_root or (project_root(task_function) if task_function else None)
        if any(registry[n].simulated is not None for n in self.names):
            from lingua_sweep.sweep.sim_backend import choose_clock

            choose_clock([registry[n] for n in self.names])
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
        self._restore_code()
        self.monitor = monitor
        self.submitter = Submitter(self)
        self.configs: dict[int, JobConfig] = {}  # job index -> its config, this process only
        self.composed_for: dict[int, tuple] = {}  # job index -> (cluster, sweep dir) of configs
        self.totals: dict[int, int] = {}  # job index -> its `steps` (the trainer's), if known
        self.tails: dict[int, Tail] = {}  # job index -> what polls read of its metrics
        self.returns: dict[int, Any] = {}  # job index -> Hydra's JobReturn, as the job made it
        self.on_result: Callable[[JobEntry], None] | None = None
        self.want_metrics = False
        self.cycle_s: list[float] = []  # each cycle's wall time (bench/scale.py reads them)
        self.cpu_start = time.process_time()  # the process's CPU (all threads) when it began
        self.created = False  # whether this process wrote the sweep's header (a new sweep)
        self._batch: list[tuple[str, dict]] | None = None  # records waiting in `one_write`
        self.submitted_any = any(j.job_id for j in self.state.jobs.values())
        self.watcher = Watcher(self)
        self.dispatcher = Dispatcher(self)
        if composer is not None:  # a trainer job must fit the GPUs of a cluster it goes to
            composer.memory_targets = [(registry[n], job_shape(registry[n], params).tasks)
                                       for n in self.names if registry[n].slurm]  # fmt: skip

    def _restore_code(self) -> None:
        """The snapshot each cluster's jobs were submitted with, from the journal: a resumed
        launcher talks to the agent in the sweep's own code, not in today's."""
        for record in self.state.extra:
            link = self.links.get(record.get("cluster")) if record["kind"] == "code" else None
            if link is not None and not link.backend.files_here:
                link.backend.code = {"snapshot": record["snapshot"], "env_dir": record["env_dir"]}

    def code_recorded(self, cluster: str) -> bool:
        return any(r["kind"] == "code" and r["cluster"] == cluster for r in self.state.extra)

    # --- opening a sweep ------------------------------------------------------------------

    def open(self, header: dict[str, Any] | None = None) -> None:
        """Takes the sweep's lock; writes its header (new sweep) or a `resumed` record."""
        self.journal.lock()
        self.state = self.journal.replay()
        self._restore_code()
        if self.state.header:
            self.record("resumed", pid=os.getpid(), host=socket.gethostname())
            return
        record = self.journal.append("sweep", **(header or {}), **sweep_header(self))
        self.state.header = record
        self.created = True

    def close(self) -> None:
        self.journal.unlock()

    def discard(self) -> bool:
        """A sweep this launcher started and a mistake stopped before any job left the queue
        (a bad override, missing data): its files go, so that a refused sweep leaves nothing
        behind (no journal that `status` would show as queued forever). After `close`."""
        if not self.created or any(j.state != QUEUED for j in self.state.jobs.values()):
            return False
        for name in (journal_lib.JOURNAL_FILE, journal_lib.LOCK_FILE, *REFUSED_SWEEP_FILES):
            (self.sweep_dir / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.sweep_dir.rmdir()  # only if nothing else is there
        return True

    @property
    def sweep_id(self) -> str:
        return self.state.header.get("id", "sweep")

    @property
    def prefix(self) -> str:
        return layout.batch_prefix(self.state.header.get("name") or "sweep", self.sweep_id)

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
            config = self.composer.job_config(overrides, index, first, str(self.sweep_dir))
            self.configs[index] = config
            self.composed_for[index] = (first.name if first else None, str(self.sweep_dir))
            if isinstance(config.steps, int):
                self.totals[index] = config.steps
            digest = config.hash
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
            start = time.perf_counter()
            self.cycle()
            self.cycle_s.append(time.perf_counter() - start)
            unfinished = [self.state.jobs[i] for i in sorted(wanted & self.state.active)]
            if not unfinished:
                return
            if self.p.detach and all(j.state not in (QUEUED, SUBMITTING) for j in unfinished):
                return
            clock.sleep(self.p.poll_interval_s)

    def cycle(self) -> None:
        if self.journal.changed_by_others():
            self.state = self.journal.replay()
        self.collect()
        self._check_cancel_request()
        self.submitter.resolve_all()
        self.watcher.record_strays()
        self.dispatcher.dispatch()
        self.watcher.poll()
        self.dispatcher.move_long_pending()
        if self.monitor is not None:
            self.monitor.update(self)

    def collect(self) -> None:
        for link in self.links.values():
            link.collect()

    def drain(self) -> None:
        """Waits for every cluster's calls in flight (each has its own deadline)."""
        for link in self.links.values():
            link.collect(wait=True)

    def jobs(self, *states: str) -> list[JobEntry]:
        """The jobs in these states (all, by default), in index order; O(jobs in them)."""
        if not states:
            return list(self.state.jobs.values())
        by_state = self.state.by_state
        indices = set().union(*(by_state.get(s, ()) for s in states))
        return [self.state.jobs[i] for i in sorted(indices)]

    def open_jobs(self) -> list[JobEntry]:
        """Jobs on a cluster and not final, in index order."""
        waiting = (*journal_lib.FINAL, QUEUED, SUBMITTING)  # not final, or not on a cluster
        indices = set().union(*(v for s, v in self.state.by_state.items() if s not in waiting))
        return [j for j in map(self.state.jobs.get, sorted(indices)) if j.job_id]

    def record(self, kind: str, **fields) -> None:
        """Writes a record, then applies it: memory never runs ahead of the journal. Inside
        `one_write`, records wait and are written (then applied) together at its end."""
        if self._batch is not None:
            self._batch.append((kind, fields))
            return
        journal_lib.apply(self.state, self.journal.append(kind, **fields))

    @contextlib.contextmanager
    def one_write(self):
        """The records made inside go to the journal in one write and one fsync when it ends
        (a poll bringing a thousand state changes: not a thousand fsyncs in the loop). Inside,
        nothing may act on them but the journal: they are not applied yet."""
        if self._batch is not None:
            yield
            return
        self._batch = []
        try:
            yield
        finally:
            batch, self._batch = self._batch, None
            for record in self.journal.append_many(batch) if batch else []:
                journal_lib.apply(self.state, record)

    # --- submitting (where each job goes: dispatch.Dispatcher) ------------------------------

    def submit(self, link: Link, share: list[JobEntry]) -> None:
        if not link.can_submit:
            return  # its thread is still on an earlier call, or it refused lately: later
        batch = self.submitter.build(link, share)
        if not self.submitter.ready(link, [t.config for t in batch.work]):
            return  # its code or data is being checked (or missing): nothing journaled
        self.record("intent", **batch.intent())
        faultpoint.hit("submit.intent")
        link.start(lambda: link.sbatch(lambda: self.submitter.run(link, batch)),
                   lambda out: self.submitter.settle(link, batch, out))  # fmt: skip
        faultpoint.hit("submit.sbatch")
        if not link.config.slurm:
            link.collect(wait=True)  # a local job starts in this process: know its pid now

    def config_for(self, job: JobEntry, cluster: ClusterConfig, base: str) -> JobConfig:
        """The job's config composed for this cluster and base dir (reused when it was)."""
        if self.composed_for.get(job.index) == (cluster.name, base):
            config = self.configs[job.index]
        else:
            config = self.composer.job_config(job.overrides, job.index, cluster, base)
            self.composed_for[job.index] = (cluster.name, base)
        if is_trainer_config(config.template) and self.code_version:
            config.template.code_version = self.code_version  # the sweep's, for all its jobs
        self.configs[job.index] = config
        return config

    @property
    def code_version(self) -> str | None:
        code = self.state.header.get("code", {})
        if not code.get("commit"):
            return None
        return code["commit"][:12] + ("-dirty" if code.get("dirty") else "")

    # --- watching -------------------------------------------------------------------------

    def job_dir(self, job: JobEntry) -> str:
        """Where the job writes, on its cluster's filesystem."""
        return job.remote_dir or layout.job_dir(self.sweep_dir, job.index)

    def metrics_path(self, job: JobEntry) -> str:
        return f"{self.job_dir(job)}/{layout.METRICS_FILE}"

    def poll_request(self, name: str, *, files: str | None) -> tuple[list[JobEntry], dict]:
        return self.watcher.poll_request(name, files=files)

    # --- cancelling -----------------------------------------------------------------------

    def _check_cancel_request(self) -> None:
        if self.state.cancel_requested and any(
            not j.final and not j.stopping for j in self.state.jobs.values()
        ):
            self.cancel_all(self.state.cancel_reason, confirm_s=0)

    def cancel_all(self, reason: str = "cancelled", *, confirm_s: float = CONFIRM_CANCEL_S):
        """Cancels every job not yet final; returns what is not confirmed cancelled (and why).

        Queued jobs end at once; an sbatch in flight is told to cancel what it submits; running
        and pending jobs get a `stop` and scancel, and end CANCELLED once Slurm says so (waited
        for up to `confirm_s`; after that the next poll, or `lingua-sweep cancel`, finishes)."""
        if not self.state.cancel_requested:
            self.record("cancel", reason=reason)
            faultpoint.hit("cancel.recorded")
        for job in self.jobs(QUEUED):
            self.record("result", index=job.index, status="CANCELLED", error=reason)
        self.drain()
        problems = self.submitter.resolve_all(cancel=True, wait=True)
        for job in self.open_jobs():
            if not job.stopping:
                self.record("stop", index=job.index, cluster=job.cluster, job_id=job.job_id,
                            status="CANCELLED", note=reason)  # fmt: skip
                faultpoint.hit("stop.recorded")
        deadline = clock.monotonic() + confirm_s
        while True:
            for link in self.links.values():
                link.down_until = 0.0  # a cancel is worth a try on every cluster now
            self.watcher.poll()
            self.drain()
            if confirm_s <= 0 or clock.monotonic() >= deadline or not self.open_jobs():
                break
            clock.sleep(min(1.0, self.p.poll_interval_s))
        if confirm_s > 0:
            problems += [f"{j.cluster}: job {j.job_id} (#{j.index}) not confirmed cancelled"
                         + (f" ({self.links[j.cluster].reason})"
                            if self.links[j.cluster].reason else "")
                         for j in self.open_jobs()]  # fmt: skip
        return problems

    def cancel_job(self, index: int, status: str, note: str, *, step: int | None = None) -> None:
        """Stops one job (a pruned trial): it ends as `status`, with why and at which step, once
        Slurm confirms it stopped; its outputs come home like a finished job's."""
        job = self.state.jobs[index]
        if job.final or job.stopping:
            return
        if job.job_id is None:  # not on a cluster yet
            self.record("result", index=index, status=status, error=note, step=step)
            return
        self.record("stop", index=index, cluster=job.cluster, job_id=job.job_id, status=status,
                    note=note, step=step)  # fmt: skip
        faultpoint.hit("stop.recorded")


def candidate_clusters(p: LauncherParams, registry: dict[str, ClusterConfig]) -> list[str]:
    """The clusters a sweep may use, in priority order; an unknown name is a user error."""
    wanted = [p.cluster] if p.cluster else (p.clusters or list(registry))
    unknown = [n for n in wanted if n not in registry]
    if unknown:
        raise UserError(
            f"unknown cluster(s) {unknown} in hydra.launcher; known: {', '.join(registry)}"
        )
    return sorted(wanted, key=lambda n: (registry[n].priority, n))
