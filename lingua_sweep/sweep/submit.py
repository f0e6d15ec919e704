"""The submit path: a share of queued jobs -> an intent in the journal -> a fenced sbatch -> ids.

Exactly once rests on three rules, each enforced here:
1. The intent (the batch's Slurm job name, its fence dir) is journaled before sbatch runs, so a
   launcher killed at any point leaves a question that `resolve` can answer.
2. A submission is declared lost (`unsubmitted`, its jobs queued again) only on the agent's
   word after it took the batch's fence: no sbatch for that name runs now, and none can start
   later (agent.submit_fenced/resolve). A timeout, a refused connection or an unreadable answer
   is "unknown", never "refused".
3. Ids are matched to jobs by their array task index, never by position: a partly visible
   array gives each job its own id or none.

The Slurm calls run on the cluster's own worker thread (controller.Link); everything that
writes the journal runs here, in the launcher's main thread.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton

from lingua_sweep.errors import UserError
from lingua_sweep.sweep import clock, faultpoint, layout, remote, shape
from lingua_sweep.sweep.compose import is_trainer_config
from lingua_sweep.sweep.job import JobTask
from lingua_sweep.sweep.journal import JobEntry
from lingua_sweep.sweep.link import LIMITS_EVERY_S

log = logging.getLogger(__name__)
MAX_SUBMIT_FAILURES = 3


@dataclass
class Batch:
    """One sbatch: what the journal's intent says, plus the pickled work to hand over."""

    batch: str
    cluster: str
    indices: list[int]
    folder: str
    fence: str
    tasks: int
    remote_dirs: dict[str, str] | None
    work: list[JobTask] = field(repr=False, default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def intent(self) -> dict[str, Any]:
        return {"batch": self.batch, "cluster": self.cluster, "indices": self.indices,
                "folder": self.folder, "fence": self.fence, "tasks": self.tasks,
                "remote_dirs": self.remote_dirs}  # fmt: skip


def ids_by_index(indices: list[int], ids: list[str]) -> dict[str, str]:
    """{job index: Slurm id}: array task K is indices[K]; a plain id only for a single job."""
    out = {}
    for job_id in ids:
        base, sep, task = job_id.partition("_")
        if sep and task.isdigit() and int(task) < len(indices):
            out[str(indices[int(task)])] = job_id
        elif not sep and len(indices) == 1:
            out[str(indices[0])] = job_id
    return out


class Submitter:
    """The controller's submit path (it owns the journal; this holds the rules)."""

    def __init__(self, controller):
        self.c = controller
        self.failures: dict[int, int] = {}  # job index -> refused submissions
        self.data_checked: dict[tuple, str | None] = {}
        self._singletons = None  # Hydra's global state, taken once (it is not cheap)

    # --- building a batch, in the main thread -----------------------------------------------

    def build(self, link, share: list[JobEntry]) -> Batch:
        c, cl = self.c, link.config
        name = c.state.header.get("name") or "sweep"
        if link.backend.files_here:
            base = str(c.sweep_dir)
        else:
            base = layout.remote_base(cl, name, c.sweep_dir, c.sweep_id)
        if self._singletons is None:
            self._singletons = Singleton.get_state()
        singletons = self._singletons
        work, remote_dirs = [], {}
        for job in share:
            config = c.config_for(job, cl, base)
            work.append(JobTask(task_function=c.task_function, config=config,
                                job_num=job.index, cluster=cl.name,
                                singletons=singletons))  # fmt: skip
            if not link.backend.files_here:
                remote_dirs[str(job.index)] = layout.job_dir(base, job.index)
        # The journal's size is a serial number: every batch follows a record of its own.
        batch = layout.batch_name(name, c.sweep_id, c.journal.size_known)
        return Batch(
            batch=batch, cluster=cl.name, indices=[j.index for j in share],
            folder=f"{base}/.submitit/%j", fence=layout.fence_dir(base),
            tasks=shape.job_shape(cl, c.p).tasks, remote_dirs=remote_dirs or None, work=work,
            params=shape.sbatch_params(cl, c.p, job_name=batch),
        )  # fmt: skip

    # --- on the cluster's worker thread ------------------------------------------------------

    def ready(self, link, configs) -> bool:
        """Whether the cluster can take these jobs now: its code prepared and their data there.
        Unknown yet: the check starts on its thread (nothing is journaled until it is known)."""
        keys = [self._data_key(link, c) for c in configs]
        prepared = (bool(link.backend.code) or link.backend.files_here) and (
            clock.monotonic() - link.limits_read_at < LIMITS_EVERY_S  # read again now and then
        )
        if prepared and all(k in self.data_checked for k in keys):
            problem = next((self.data_checked[k] for k in keys if self.data_checked[k]), None)
            if problem:
                link.unusable = problem
                if any(not other.unusable for other in self.c.links.values()):
                    # The sweep goes on elsewhere; otherwise its error says this, once.
                    log.error("cluster %s cannot run this sweep: %s", link.config.name, problem)
            return problem is None
        link.start(lambda: self._prepare(link, configs, keys),
                   lambda out: self._prepared(link, out))  # fmt: skip
        return False

    def _prepare(self, link, configs, keys) -> dict[str, Any]:
        try:
            link.backend.prepare()
        except remote.RemoteError as e:
            return {"down": f"cannot prepare its code: {e.reason}"}
        except UserError as e:
            return {"unusable": str(e)}
        try:
            limits = read_limits(link, self.c.prefix)
        except remote.RemoteError as e:
            return {"down": f"cannot read its limits: {e.reason}"}
        found = {}  # (each data set is checked once)
        for key, config in zip(keys, configs, strict=True):
            if key not in found and key not in self.data_checked:
                try:
                    found[key] = self._check_data(link, config)
                except remote.RemoteError as e:
                    return {"down": e.reason}
        return {"found": found, **limits}

    def _prepared(self, link, out: dict[str, Any]) -> None:
        if "down" in out:
            log.warning("cluster %s: %s", link.config.name, out["down"])
            link.down(out["down"], self.c.p.poll_interval_s)
        elif "unusable" in out:
            link.unusable = out["unusable"]
        else:
            self.data_checked.update(out["found"])
            got_limits(link, out)

    def run(self, link, b: Batch) -> dict[str, Any]:
        """The fenced sbatch, on the cluster's thread. Never raises: the outcome says what
        happened, and whether sbatch may have run (`unknown`)."""
        try:
            reply = link.backend.submit(b.work, folder=b.folder, params=b.params, batch=b.batch,
                                        fence=b.fence)  # fmt: skip
        except remote.RemoteError as e:
            return {"unknown": e.reason, "code": link.backend.code}
        return {**reply, "code": link.backend.code}

    def _data_key(self, link, job_config) -> tuple | None:
        cl, config = link.config, job_config.data_view()
        if not is_trainer_config(config) or not cl.data_on_login_node:
            return None
        return (cl.name, config.data.root, config.data.train_files, config.data.val_file)

    def _check_data(self, link, job_config) -> str | None:
        """The trainer's data must exist where the job will run, before anything is submitted:
        checked here for this machine's filesystem, by the agent on a login node."""
        cl = link.config
        if self._data_key(link, job_config) is None:
            return None
        config = job_config.data_view()
        root = str(config.data.root)
        # Name the cluster only where the root is its default, not one the user set.
        from_cluster = root == str(cl.data_root)
        if link.backend.files_here:
            from lingua_sweep.data import check_data_files

            try:
                check_data_files(config.data, cluster=cl.name if from_cluster else None)
            except UserError as e:
                return str(e)
            return None
        patterns = [f"{root}/{config.data.train_files}", f"{root}/{config.data.val_file}"]
        missing = link.backend.missing(patterns)
        if missing:
            origin = f"data.root={root}" + (f" from cluster {cl.name}" if from_cluster else "")
            return (f"{missing[0]} does not exist on {cl.name}'s login node ({origin}); copy the "
                    "data there or set data.root")  # fmt: skip
        return None

    # --- back in the main thread: what the journal learns ------------------------------------

    def settle(self, link, b: Batch, out: dict[str, Any]) -> None:
        c = self.c
        code = out.get("code")
        if code and not c.code_recorded(link.config.name):
            c.record("code", cluster=link.config.name, **code)
        if "ids" in out:
            link.refusals = 0
            faultpoint.hit("submit.landed")
            self.landed(b.intent(), out["ids"])
            return
        if "unknown" in out:
            # sbatch may or may not have run: `resolve` settles it once the fence is free.
            log.warning("cluster %s: submission of %s unconfirmed: %s", b.cluster, b.batch,
                        out["unknown"])  # fmt: skip
            link.down(out["unknown"], c.p.poll_interval_s)
            return
        reason = out.get("refused") or "fenced by an earlier resolve"
        kind = out.get("kind", "permanent") if "refused" in out else "fenced"
        c.record("unsubmitted", batch=b.batch, indices=b.indices, reason=reason)
        if kind == "too_big" and len(b.indices) > 1:
            link.max_array = len(b.indices) // 2
            log.warning("cluster %s refused an array of %d (%s): submitting %d at a time",
                        b.cluster, len(b.indices), reason, link.max_array)  # fmt: skip
            return
        if kind == "transient":
            wait = link.refused(c.p.poll_interval_s)
            link.limits_read_at = -1e9  # what changed is read again before the next try
            log.warning("cluster %s refused %s for now (%s): next try in %.0fs", b.cluster,
                        b.batch, reason, wait)  # fmt: skip
            return
        log.error("cluster %s refused %s: %s", b.cluster, b.batch, reason)
        for index in b.indices:
            self.failures[index] = self.failures.get(index, 0) + 1
            if kind != "fenced" or self.failures[index] >= MAX_SUBMIT_FAILURES:
                # The jobs cannot run as asked there: FAILED, with the refusal in words.
                c.record("result", index=index, status="FAILED",
                         error=f"sbatch refused on {b.cluster}: {reason}")  # fmt: skip

    def landed(self, intent: dict[str, Any], ids: list[str]) -> None:
        """The ids of a batch, from sbatch or from `resolve`: each to its own job."""
        c = self.c
        indices = intent["indices"]
        job_ids = ids_by_index(indices, ids)
        if job_ids:
            c.record("submitted", batch=intent["batch"], cluster=intent["cluster"],
                     folder=intent["folder"], tasks=intent["tasks"],
                     remote_dirs=intent.get("remote_dirs"), job_ids=job_ids)  # fmt: skip
            c.submitted_any = True
            for index, job_id in job_ids.items():
                log.info("#%s -> %s job %s", index, intent["cluster"], job_id)
        lost = [i for i in indices if str(i) not in job_ids]
        if lost:  # the fence guarantees they never will land: back to the queue
            c.record("unsubmitted", batch=intent["batch"], indices=lost,
                     reason="never reached Slurm")  # fmt: skip

    def resolve_all(self, *, cancel: bool = False, wait: bool = False) -> list[str]:
        """Asks each cluster what became of the intents without ids; returns the problems.

        Runs on the clusters' threads, in parallel; with `wait`, this call waits for them."""
        c = self.c
        by_cluster: dict[str, list[dict]] = {}
        for intent in c.state.intents.values():
            by_cluster.setdefault(intent["cluster"], []).append(dict(intent))
        problems = []
        for name, intents in by_cluster.items():
            link = c.links.get(name)
            if link is None or (not wait and (link.busy or not link.available)):
                continue
            link.start(
                lambda link=link, intents=intents: self._resolve(link, intents, cancel),
                lambda out, link=link: problems.extend(self._settle_resolved(link, out)),
            )
        if wait:
            c.drain()
        return problems

    def _resolve(self, link, intents: list[dict], cancel: bool) -> list[tuple[dict, dict]]:
        out = []
        for intent in intents:
            fence = intent.get("fence") or layout.fence_dir(Path(intent["folder"]).parent.parent)
            try:
                reply = link.backend.resolve(intent["batch"], fence, since=intent.get("t"),
                                             cancel=cancel)  # fmt: skip
            except remote.RemoteError as e:
                reply = {"error": e.reason}
            out.append((intent, reply))
        return out

    def _settle_resolved(self, link, out: list[tuple[dict, dict]]) -> list[str]:
        problems = []
        for intent, reply in out:
            if intent["batch"] not in self.c.state.intents:
                continue  # settled meanwhile
            if "ids" in reply:
                if reply["ids"]:
                    log.info("found submission %s on %s: %s", intent["batch"], intent["cluster"],
                             reply["ids"])  # fmt: skip
                self.landed(intent, reply["ids"])
            elif reply.get("in_flight"):
                problems.append(f"{intent['cluster']}: sbatch of {intent['batch']} still running")
            else:
                link.down(reply["error"], self.c.p.poll_interval_s)
                problems.append(f"{intent['cluster']}: {reply['error']}")
        return problems


def read_limits(link, prefix: str) -> dict[str, Any]:
    """On the cluster's thread: the user's limits and other jobs there (may raise RemoteError)."""
    limits, usage = link.backend.limits(prefix)
    return {"limits": limits, "usage": usage, "read_at": clock.monotonic()}


def got_limits(link, out: dict[str, Any]) -> None:
    """In the main thread: what read_limits found, for the dispatcher's room."""
    if "limits" in out:
        link.limits, link.usage, link.limits_read_at = out["limits"], out["usage"], out["read_at"]
