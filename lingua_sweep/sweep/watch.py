"""Watching a sweep's jobs: one poll per cluster on its own thread, what it says journaled here.

A poll brings each job's state (and whether it ever ran, from its own status.json), the outcome
of those that ended, the metrics of running ones, and every active Slurm job carrying the
sweep's name. Before polling, the cluster's thread sends the scancels still owed: the jobs with
a `stop` not yet confirmed, and strays. A job with a stop is final (or moved) only when Slurm
says it ended; a finished job's outputs are brought home before its result is journaled.
"""

import logging
from pathlib import Path
from typing import Any

from lingua_sweep.sweep import clock, faultpoint, layout, remote
from lingua_sweep.sweep import job as job_lib
from lingua_sweep.sweep import journal as journal_lib
from lingua_sweep.sweep.journal import SUBMITTING, JobEntry
from lingua_sweep.sweep.link import Link
from lingua_sweep.sweep.states import HELD, HELD_REASONS
from lingua_sweep.sweep.tails import Tail

log = logging.getLogger(__name__)
# A job Slurm says COMPLETED whose results are not there yet (a network filesystem shows files
# late) is given this long before it counts as FAILED.
RESULT_GRACE_S = 60.0
# The JobReturns handed back to Hydra's sweeper carry each job's config (Hydra's contract) in
# sweeps up to this size; beyond it, none (`cfg` is None): memory.
RETURNS_WITH_CONFIG_UP_TO = 1000


class Watcher:
    def __init__(self, controller):
        self.c = controller
        self._active_strays: set[str] = set()  # stray ids still active: cancelled each poll
        self._last_poll: dict[str, float] = {}  # cluster -> when it was last polled
        self.pending_seen: dict[int, float] = {}  # job index -> when a poll last saw it PENDING
        self._missing_since: dict[int, float] = {}  # job index -> first poll without results
        self.polls: dict[str, int] = {}  # cluster -> polls sent (bench/scale.py compares them)

    def poll_request(self, name: str, *, files: str | None) -> tuple[list[JobEntry], dict]:
        """The poll of one cluster's open jobs; `files`: whose metrics to bring, "running" (the
        launcher, which saw them start) or "open" (`status`, which may not have)."""
        c = self.c
        mine = [j for j in c.open_jobs() if j.cluster == name]
        request = {
            "jobs": [
                {"id": j.job_id, "folder": j.folder, "tasks": j.tasks, "dir": c.job_dir(j)}
                for j in mine
            ],  # fmt: skip
            # Each from where the last poll left off: only what is new comes over.
            "files": {
                c.metrics_path(j): getattr(c.tails.get(j.index), "offset", None)
                for j in mine
                if files == "open" or (files == "running" and j.state == "RUNNING")
            },
            "prefix": c.prefix,
        }
        return mine, request

    def poll(self) -> None:
        c = self.c
        for name, link in c.links.items():
            # Behind a submission in flight if need be (a sweep submitting every cycle must
            # still see its jobs end), but never two polls queued.
            if link.polling or not link.available:
                continue
            mine, request = self.poll_request(name, files="running" if c.want_metrics else None)
            strays = [i for i in sorted(self._active_strays)
                      if c.state.known_ids.get((name, i), -1) is None]  # fmt: skip
            used = any(cl == name for cl, _ in c.state.known_ids) and link.config.slurm
            quiet = clock.monotonic() - self._last_poll.get(name, -1e9) < c.p.probe_every_s
            if not mine and not strays and not (used and not quiet):
                continue  # nothing to watch; now and then a look for strays all the same
            self._last_poll[name] = clock.monotonic()
            self.polls[name] = self.polls.get(name, 0) + 1
            stops = [j.job_id for j in mine if j.stopping] + strays
            link.start(lambda link=link, request=request, stops=stops:
                       self._poll_work(link, request, stops),
                       lambda out, link=link, mine=mine: self._polled(link, mine, out),
                       kind="poll")  # fmt: skip

    def _poll_work(self, link: Link, request: dict, stops: list[str]) -> dict[str, Any]:
        """On the cluster's thread: scancel what must stop, poll, bring finished jobs' outputs
        home. Never raises."""
        c = self.c
        out: dict[str, Any] = {"asked_at": clock.now()}
        if stops:
            try:
                link.backend.cancel(stops)
                out["cancelled"] = stops
            except remote.RemoteError as e:
                log.warning("cluster %s: could not cancel %s: %s", link.config.name, stops,
                            e.reason)  # fmt: skip
        try:
            out["reply"] = link.backend.poll(request)
        except remote.RemoteError as e:
            out["error"] = e.reason
            return out
        for j in request["jobs"]:
            if j["id"] in out["reply"]["outcomes"] and not link.backend.files_here:
                faultpoint.hit("fetch")
                local_dir = c.sweep_dir / j["dir"].rsplit("/", 1)[-1]
                try:
                    link.backend.fetch(j["dir"], local_dir)
                except remote.RemoteError as e:
                    log.warning("could not fetch outputs of job %s from %s: %s", j["id"],
                                link.config.name, e.reason)  # fmt: skip
        return out

    def _polled(self, link: Link, mine: list[JobEntry], out: dict[str, Any]) -> None:
        c = self.c
        name = link.config.name
        if "error" in out:
            if link.failures == 0:
                log.warning("cluster %s does not answer (%s); retrying", name, out["error"])
            link.down(out["error"], c.p.poll_interval_s)
            return
        if link.failures:
            log.info("cluster %s answers again", name)
        link.up()
        reply = out["reply"]
        if reply.get("usage") is not None:
            link.usage = reply["usage"]
        with c.one_write():  # one fsync for the whole poll; results are told after it
            self._note_strays(name, reply.get("named", {}))
            ended = [job for job in mine if self._read(job, reply, out["asked_at"])]
        for job in ended:
            job = c.state.jobs[job.index]
            if job.final and c.on_result is not None:
                c.on_result(job)

    def _read(self, old: JobEntry, reply: dict[str, Any], asked_at: float) -> bool:
        """What one poll says of one job, journaled; whether it ended."""
        c = self.c
        job = c.state.jobs[old.index]
        if job.final or job.job_id != old.job_id:
            return False  # settled meanwhile (a cancel, a move)
        outcome = reply["outcomes"].get(job.job_id)
        if outcome is not None:
            self.finish(job, outcome)
            return True
        info = reply["states"].get(job.job_id, {})
        state = info.get("state", "UNKNOWN")
        state = {"COMPLETING": "RUNNING", "CONFIGURING": "PENDING"}.get(state, state)
        ran = bool(info.get("ran")) and job.started_at is None
        if state == "PENDING" and not info.get("ran"):
            # Pending as of when this poll was sent, not when its answer was read (a laptop
            # that slept in between reads an old answer late).
            self.pending_seen[job.index] = asked_at
        reason = info.get("reason") or None
        changed = state != job.state or (state == "PENDING" and reason != job.reason)
        if ran or (changed and not (state == "UNKNOWN" and job.state != SUBMITTING)):
            c.record("state", index=job.index, state=state, reason=reason,
                     ran=ran or None)  # fmt: skip
        if (state in HELD or reason in HELD_REASONS) and not job.stopping:
            # Held after a requeue: it never starts alone. Cancelled, then submitted again.
            c.record("stop", index=job.index, cluster=job.cluster, job_id=job.job_id,
                     status="RESUBMIT", note=f"held by Slurm ({reason or state})")  # fmt: skip
        if state == "PENDING" and c.p.placement == "time_to_result":
            c.dispatcher.forecaster.note_pending(c.state.jobs[job.index], info.get("start"))
        piece = reply["files"].get(c.metrics_path(job))
        if piece is not None:
            c.tails.setdefault(job.index, Tail()).feed(piece)
        return False

    def _note_strays(self, cluster: str, named: dict[str, str]) -> None:
        """Active jobs with this sweep's name: one the journal does not know (and no open
        intent explains) is a stray: journaled now, cancelled at the next poll."""
        c = self.c
        self._active_strays = {i for i in self._active_strays if i in named}
        for job_id, batch in named.items():
            key = (cluster, job_id)
            if key not in c.state.known_ids and batch not in c.state.intents:
                log.warning("job %s on %s (%s) is not this sweep's to run: cancelling it",
                            job_id, cluster, batch)  # fmt: skip
                c.record("stray", cluster=cluster, job_id=job_id, batch=batch,
                         note="active, unknown to the journal")  # fmt: skip
                self._active_strays.add(job_id)  # (the record is applied after the poll)
            if c.state.known_ids.get(key, -1) is None:
                self._active_strays.add(job_id)

    def record_strays(self) -> None:
        """Ids that landed for a job which had moved on (journal `submitted` after the fact)."""
        c = self.c
        for (cluster, job_id), batch in list(c.state.strays.items()):
            c.record("stray", cluster=cluster, job_id=job_id, batch=batch,
                     note="landed for a job that had moved on")  # fmt: skip
            self._active_strays.add(job_id)

    def finish(self, job: JobEntry, outcome: dict[str, Any]) -> None:
        c = self.c
        c.tails.pop(job.index, None)  # its metrics are read from its dir from now on
        local_dir = Path(layout.job_dir(c.sweep_dir, job.index))
        status, error, step = outcome["status"], outcome.get("error"), outcome.get("step")
        stop = job.stopping
        if stop and status != "COMPLETED":  # it ended because we stopped it
            if stop["status"] == "MOVE":
                log.info("#%d left %s (job %s): %s", job.index, job.cluster, job.job_id,
                         stop["note"])  # fmt: skip
                c.record("moved", index=job.index, cluster=job.cluster, job_id=job.job_id,
                         to=stop["to"], reason=stop["note"])  # fmt: skip
                return
            status, error, step = stop["status"], stop["note"], stop.get("step")
        if outcome.get("missing"):
            first = self._missing_since.setdefault(job.index, clock.monotonic())
            if clock.monotonic() - first < RESULT_GRACE_S:
                return  # asked again at the next poll
        if status == "RESUBMIT":
            if job.resubmits < c.p.max_resubmits:
                log.warning("#%d on %s (job %s): %s; submitting it again there, to resume from "
                            "its checkpoint (%d of %d)", job.index, job.cluster, job.job_id,
                            error, job.resubmits + 1, c.p.max_resubmits)  # fmt: skip
                c.record("resubmit", index=job.index, cluster=job.cluster, job_id=job.job_id,
                         to=job.cluster, reason=error)  # fmt: skip
                return
            status = "FAILED"
            error = (f"{error}, after {job.resubmits} resubmissions (raise "
                     "hydra.launcher.max_resubmits)")  # fmt: skip
        ret = outcome.get("job_return")
        if ret is not None:
            if len(c.state.jobs) > RETURNS_WITH_CONFIG_UP_TO:
                # Its configs are the job's whole composition (~100 KB): for 10,000 jobs, a
                # gigabyte. Hydra's own sweepers read the value, status and dir only.
                ret.cfg = ret.hydra_cfg = None
            c.returns[job.index] = ret
        value, pickled = journal_lib.encode_value(outcome.get("value"))
        faultpoint.hit("poll.final")
        job_lib.write_status(local_dir, status=status, error=error, cluster=job.cluster,
                             **({"step": step} if step is not None else {}))  # fmt: skip
        c.record("result", index=job.index, status=status, value=value,
                 value_pickle=pickled, error=error, step=step)  # fmt: skip
        if status == "FAILED":
            log.error("#%d on %s (job %s) FAILED: %s", job.index, job.cluster, job.job_id, error)
