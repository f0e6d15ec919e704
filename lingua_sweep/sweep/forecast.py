"""The dispatcher's eyes for time-to-result placement: Slurm's start estimates (fetched by
`estimates`) corrected by what this sweep has seen (speeds, how late Slurm's estimates were),
each cluster's outlook, the placements and moves that `placement` computes from them, and every
prediction journaled (`forecast` records) beside what happened, so that `results` can score them
(`predictions`).
"""

import math
from typing import Any

from lingua_sweep.sweep import clock
from lingua_sweep.sweep import placement as pl
from lingua_sweep.sweep.estimates import Estimates
from lingua_sweep.sweep.journal import SUBMITTING, JobEntry
from lingua_sweep.sweep.predictions import hhmm
from lingua_sweep.sweep.shape import job_shape
from lingua_sweep.sweep.shape import room as shape_room
from lingua_sweep.sweep.states import FINAL, first_in_line, set_start


class Forecaster:
    def __init__(self, controller):
        self.c = controller
        # job index -> (cluster, its squeue --start there), latest poll
        self.slurm_start: dict[int, tuple[str, float]] = {}
        # job index -> (cluster, when, squeue --start) the first time Slurm gave one
        self.first_estimate: dict[int, tuple[str, float, float]] = {}
        self.observed = pl.Observed()
        self.slurm = Estimates(controller, self.observed)  # Slurm's word, fetched in the background
        self._started_seen: set[int] = set()  # jobs whose start was observed
        self._done_seen: set[int] = set()  # jobs whose run time was observed
        self._ended_seen: set[int] = set()  # jobs whose end was observed
        self.last_end: dict[str, float] = {}  # cluster -> when a job of ours there last ended
        self._waiting_at = -1e9  # when the waiting jobs' lateness was last taken (monotonic)
        self._table: dict[str, float | None] | None = None  # cluster -> the GPU table's FLOP/s
        self.placed: dict[int, dict[str, Any]] = {}  # job -> prediction, until it is submitted
        self.held: dict[int, float] = {}  # job waiting here -> the turn it was promised (epoch)

    # --- Slurm's estimates, corrected ---------------------------------------------------------

    def corrected(self, cluster: str, start: float, asked: float) -> float:
        """Slurm's estimate made at `asked`, corrected by how late its estimates there were."""
        return asked + max(start - asked, 0.0) * self.observed.correction(cluster)

    # --- what the sweep has seen ---------------------------------------------------------------

    def size(self, index: int) -> tuple[float, bool]:
        config = self.c.configs.get(index)
        return pl.job_size(getattr(config, "work_flops", None), self.c.p.expected_run_s)

    def _asked(self, job: JobEntry) -> tuple[str, float, float] | None:
        """(cluster, when, start) of Slurm's word on a job: when it was placed, else its first
        `squeue --start`."""
        plan = job.planned if (job.planned or {}).get("slurm_start") else None
        if plan:
            return plan["cluster"], plan["at"], plan["slurm_start"]
        return self.first_estimate.get(job.index)

    def learn(self) -> None:
        """Run times of finished jobs and starts of planned ones, each counted once (set
        differences: a 10,000-job sweep costs no Python loop over its finished jobs), and how
        late the jobs still waiting already are (once a probe)."""
        by_state = self.c.state.by_state
        done = by_state.get("COMPLETED", set())
        for index in (by_state.get("RUNNING", set()) | done) - self._started_seen:
            self._started_seen.add(index)
            job = self.c.state.jobs[index]
            asked = self._asked(job)
            self.first_estimate.pop(index, None)
            if job.started_at is not None and asked and asked[0] == job.cluster:
                self.observed.add_start(job.cluster, asked[1], asked[2], job.started_at)
        if clock.monotonic() - self._waiting_at >= self.c.p.probe_every_s:
            self._waiting_at, now = clock.monotonic(), clock.now()
            waiting: dict[str, list[float]] = {}
            for index in by_state.get("PENDING", set()):
                job = self.c.state.jobs[index]
                asked = self._asked(job)
                bound = pl.wait_ratio(asked[1], asked[2], now) if asked else None
                if bound is not None and asked[0] == job.cluster and job.started_at is None:
                    waiting.setdefault(job.cluster, []).append(bound)
            self.observed.waiting = waiting
        for index in set().union(*(by_state.get(s, set()) for s in FINAL)) - self._ended_seen:
            self._ended_seen.add(index)
            job = self.c.state.jobs[index]
            if job.cluster and job.ended_at:
                self.last_end[job.cluster] = max(self.last_end.get(job.cluster, 0.0), job.ended_at)
        for index in done - self._done_seen:
            self._done_seen.add(index)
            job = self.c.state.jobs[index]
            if job.started_at is not None and job.ended_at is not None:
                size, _ = self.size(index)
                self.observed.add_run(job.cluster, size, job.ended_at - job.started_at)

    def run_s(self, index: int, cluster: str) -> float | None:
        size, in_flops = self.size(index)
        if self._table is None:
            self._table = {n: pl.table_flops(link.config) for n, link in self.c.links.items()}
        return pl.run_seconds(size, in_flops, cluster, self.observed, self._table)

    # --- outlooks, placement, moves ------------------------------------------------------------

    def outlook(self, name: str, room: int, index: int, now: float) -> pl.Outlook:
        run = self.run_s(index, name)
        start = None
        # Held to our limit there, only our own jobs' ends make room: Slurm's estimate (free
        # nodes) does not apply.
        headroom = self.c.dispatcher.headroom(name).start
        held, estimate = self.slurm.held_room, self.slurm.estimates.get(name, (None, 0.0))
        if room > 0:
            room, until = held.usable_room(name, room), held.until(name)
            if room == 0 and until is not None:
                # Not scaled by Slurm's lateness: a reservation's end is no running job's limit.
                start = until - now
        if start is None and headroom != 0 and estimate[0] is not None:
            epoch, asked = estimate
            start = self.corrected(name, epoch, asked) - now
        # Our job there ends by its run time; with none known, by its time limit at the latest,
        # as Slurm assumes of every job (else a job behind our limit on alpha went to beta's
        # queue, a year away behind jobs with no limit).
        ends_by = run if run is not None else self.c.p.timeout_min * 60.0
        frees, pending, first = [], [], None
        for job in self._ours(name):
            if job.started_at is not None:
                frees.append(pl.remaining_s(ends_by, now - job.started_at))
            else:
                expected = self.pending_start(job)
                pending.append(None if expected is None else expected - now)
                if first_in_line(job.reason):
                    first = len(pending) - 1
        if headroom is None and first is not None and frees:
            # Slurm's word for the job first in line counts our running jobs to their time
            # limits; the node the first of them frees is its own (job 21 of 24 was moved to
            # a slower cluster on an estimate an hour past our job's end there).
            expected = pending[first]
            pending[first] = min(frees) if expected is None else min(expected, min(frees))
        if headroom is not None:  # the user's other jobs there hand on their slots too
            frees += [max(end - now, 0.0) for end in (self.c.links[name].usage or {}).get(
                "ends", [])]  # fmt: skip
        blackout = held.blackout(name)
        if blackout is not None:
            blackout = (blackout[0] - now, blackout[1] - now)
        return pl.Outlook(name=name, room=room, next_start_s=start, run_s=run, frees_s=frees,
                          pending_s=pending, headroom=headroom, capacity=self._capacity(name),
                          blackout=blackout, full=room <= 0 and self._full(name))  # fmt: skip

    def _full(self, name: str) -> bool:
        """Whether sinfo showed no idle node there that a job of ours could take (beyond our
        limit; nodes Slurm holds are none); not known: not full."""
        link = self.c.links[name]
        if link.status is None:
            return False
        shown = shape_room(link.status, link.config, job_shape(link.config, self.c.p))
        return self.slurm.held_room.usable_room(name, shown) <= 0

    def _capacity(self, name: str) -> int:
        """How many jobs of the sweep's shape the whole cluster runs at once."""
        link = self.c.links[name]
        shape = job_shape(link.config, self.c.p)
        nodes = len(link.status.nodes) if link.status is not None and link.status.nodes else 1
        per_node = (link.config.gpus_per_node // shape.gpus_per_node
                    if shape.gpus_per_node else 1)  # fmt: skip
        return max(1, nodes * max(per_node, 1) // max(shape.nodes, 1))

    def _ours(self, name: str) -> list[JobEntry]:
        """Our jobs on a cluster that hold or will hold a slot there, in queue order: those
        still being submitted too (placed on the same slot a cycle later, two jobs were
        predicted to start at once under a limit of one)."""
        c = self.c
        return [j for j in c.open_jobs() + c.jobs(SUBMITTING)
                if j.cluster == name and not j.stopping]  # fmt: skip

    def pending_start(self, job: JobEntry) -> float | None:
        """When a job pending in a queue is expected to start (epoch, corrected): by Slurm's
        latest estimate, and no sooner than jobs that waited as long as it has started."""
        cluster, slurm = self.slurm_start.get(job.index, (None, None))
        if slurm is None or cluster != job.cluster:  # none yet, or said where it waited before
            return None
        if set_start(job.reason):  # a reservation's end, a begin time: as Slurm says
            return slurm
        seen = self.c.watcher.pending_seen.get(job.index, 0.0)
        start = self.corrected(job.cluster, slurm, seen)
        asked = self._asked(job)
        waited = pl.wait_ratio(asked[1], asked[2], clock.now()) if asked else None
        if waited is not None and asked[0] == job.cluster:
            lateness = self.observed.correction(job.cluster, waited=waited)
            start = max(start, asked[1] + lateness * (asked[2] - asked[1]))
        return start

    def place(self, queued: list[JobEntry], rooms: dict[str, int], order: list[str],
              queue_on: str | None, too_big: list[dict[str, str]]) -> list[str | None]:  # fmt: skip
        """The cluster for each queued job (None: wait here); the predictions behind them wait
        in `self.placed` until `journal_placed` records those of jobs that were submitted."""
        c, now = self.c, clock.now()
        self.learn()
        self.slurm.await_first(order, c.p.probe_timeout_s or 10)
        plan = pl.Plan([self.outlook(n, rooms.get(n, 0), queued[0].index, now) for n in order],
                       n_jobs=len(queued))  # fmt: skip
        targets, forecasts = [], {}
        allowed = [[n for n in order if n not in skip] for skip in too_big]
        for job, choice, ok in zip(queued, pl.place(plan, allowed), allowed, strict=True):
            target = choice.cluster
            if target is None or not math.isfinite(choice.finish_s):
                # Nothing known: as before, the first reachable (that the job fits).
                fallback = None if queue_on is None else (
                    queue_on if queue_on in ok else next(iter(ok), None))  # fmt: skip
                target = fallback if c.p.when_busy == "queue" else None
            elif choice.start_s > 0 and (
                c.p.when_busy != "queue" or (choice.own_turn and self.holds(job, choice, now))
            ):
                # No room anywhere now: wait here, as `wait` says; or its turn comes when a job
                # of ours ends under our limit: no queue place to keep, so it waits here and is
                # placed afresh (wherever is best then) when a slot frees.
                target = None
            if target is not None:
                self.held.pop(job.index, None)
            targets.append(target)
            if target is not None and target == choice.cluster:  # a prediction, not a default
                forecasts[job.index] = self._forecast(target, choice, now, planned=True)
        self.placed = forecasts
        return targets

    def holds(self, job: JobEntry, choice: pl.Choice, now: float) -> bool:
        """Whether a job whose turn comes as one of ours ends waits here for it: not past the
        turn it was first promised, which our jobs queued there took (one job was held 5,000 s
        while 11 later ones went ahead); then it queues. (A detached launcher leaves nothing
        here.)"""
        if self.c.p.detach:
            return False
        promised = self.held.setdefault(job.index, now + choice.start_s)
        return now < promised + self.c.p.probe_every_s

    def journal_placed(self) -> None:
        """The predictions of the jobs the last placement sent off (its intents are journaled);
        the others are placed again next cycle."""
        c = self.c
        jobs = c.state.jobs
        sent = {str(i): f for i, f in self.placed.items()
                if jobs[i].state == SUBMITTING and jobs[i].cluster == f["cluster"]}  # fmt: skip
        self.placed = {}
        if sent:
            c.record("forecast", indices=[int(i) for i in sent], jobs=sent)

    def _forecast(self, cluster: str, choice: pl.Choice, now: float, *, planned: bool,
                  slurm_start: float | None = None) -> dict[str, Any]:  # fmt: skip
        if slurm_start is None and choice.start_s > 0:
            slurm_start = self.slurm.next_start(cluster)
        run = choice.finish_s - choice.start_s if cluster == choice.cluster else None
        out = {"cluster": cluster, "at": round(now, 1), "start": round(now + choice.start_s, 1),
               "slurm_start": slurm_start and round(slurm_start, 1),
               "run_s": run if run is None else round(run, 1),
               "alt": {n: round(now + f, 1) for n, f in choice.alternatives.items()}}  # fmt: skip
        return {**out, "planned": True} if planned else out

    def moves(self, rooms: dict[str, int], names: list[str]) -> list[tuple[JobEntry, str, str]]:
        """Pending jobs that finish clearly sooner on another of `names`: (job, target, why)."""
        c, now = self.c, clock.now()
        self.learn()
        candidates = [
            j for j in c.jobs("PENDING")
            if j.started_at is None and j.moves == 0 and not j.stopping and j.submitted_at
            and j.index in c.watcher.pending_seen
        ]  # fmt: skip
        # Where one of ours just ended, or a node it can use is free, Slurm starts it at its
        # next pass: its estimate and state are from before (a job pending behind ours was
        # moved as ours ended, and killed as it started there).
        about_to_start = {n for n in {j.cluster for j in candidates}
                          if now - self.last_end.get(n, 0.0) < c.p.probe_every_s
                          or self.slurm.held_room.free_now(n)}  # fmt: skip
        candidates = [j for j in candidates if j.cluster not in about_to_start]
        if not candidates:
            return []
        self.slurm.ask(names, rooms)
        here_names = {j.cluster for j in candidates}
        plan = pl.Plan([self.outlook(n, rooms.get(n, 0), candidates[0].index, now)
                        for n in dict.fromkeys([*names, *here_names])],
                       n_jobs=len(candidates))  # fmt: skip
        expected = {}
        for name in here_names:
            expected.update(self._waiting_starts(plan, name))
        out = []
        for job in candidates:
            run = self.run_s(job.index, job.cluster)
            if run is None or job.index not in expected:
                continue
            here = expected[job.index] + run
            others = [n for n in names if n != job.cluster]
            choice = pl.better_elsewhere(here, plan, others,
                                         min_gain_s=2 * c.p.probe_every_s)  # fmt: skip
            if choice is None or choice.start_s > 0:
                # Only where it starts now: a move to another queue trades one estimate for
                # another, and a scancel costs the job its place here.
                continue
            plan.take(choice.cluster)
            why = (f"finishes ~{hhmm(now + choice.finish_s)} on {choice.cluster}, "
                   f"~{hhmm(now + here)} here")  # fmt: skip
            c.record("forecast", index=job.index, jobs={str(job.index): self._forecast(
                choice.cluster, choice, now, planned=True)})  # fmt: skip
            out.append((job, choice.cluster, why))
        return out

    def sooner_here(self, job: JobEntry, target: str, rooms: dict[str, int]) -> bool:
        """Whether a pending job is predicted to finish where it waits not clearly later (by the
        move margin) than in the target's room now: then the `max_pending_s` safety net leaves
        it (it moved the last job of a sweep, first in line behind our own job's end, to a 1.5x
        slower cluster)."""
        now, here = clock.now(), job.cluster
        run_here, run_there = self.run_s(job.index, here), self.run_s(job.index, target)
        if run_here is None or run_there is None:
            return False
        plan = pl.Plan([self.outlook(here, rooms.get(here, 0), job.index, now)])
        starts = self._waiting_starts(plan, here)
        if job.index not in starts:
            return False
        return not pl.clear_gain(starts[job.index] + run_here, run_there,
                                 min_gain_s=2 * self.c.p.probe_every_s)  # fmt: skip

    def _waiting_starts(self, plan: pl.Plan, name: str) -> dict[int, float]:
        """Each of our jobs waiting in a cluster's queue -> its start as the plan sees that
        queue (Slurm's, or its turn behind our own jobs there); none where no run time is
        known."""
        waiting = [j.index for j in self._ours(name) if j.started_at is None]
        return dict(zip(waiting, plan.pending_starts[name], strict=False))

    def note_pending(self, job: JobEntry, slurm_start: float | None) -> None:
        """A poll's `squeue --start` for a pending job; journaled when it moved noticeably.
        None: Slurm gives it none now (held by our own limit: its turn is one of our jobs'
        ends, not the estimate it had before; the safety net moved a job whose turn came in
        135 s on an estimate of hours)."""
        if not slurm_start:
            self.slurm_start.pop(job.index, None)
            return
        self.slurm_start[job.index] = (job.cluster, slurm_start)
        self.first_estimate.setdefault(job.index, (job.cluster, clock.now(), slurm_start))
        last = (job.forecast or {}).get("slurm_start")
        now = clock.now()
        if last is not None and abs(slurm_start - last) <= max(0.2 * (last - now), 60.0):
            return
        start = self.corrected(job.cluster, slurm_start, now)
        self.c.record("forecast", index=job.index, jobs={str(job.index): {
            "cluster": job.cluster, "at": round(now, 1), "start": round(start, 1),
            "slurm_start": round(slurm_start, 1)}})  # fmt: skip
