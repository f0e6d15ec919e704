"""Which queued job goes to which cluster now: capacity in the job's own units, within the
user's limits, priority order; and which waiting job should move.

A job needs `nodes` nodes, each with `gpus_per_node` free GPUs (or, on a partition without
GPUs, `tasks_per_node * cpus_per_task` free CPUs). A cluster's room is how many such jobs its
idle and mixed nodes can start now, minus our own jobs already waiting in its queue (they will
take that room first). Pure functions of probe results: the controller does the I/O.
"""

import logging
import math
from collections.abc import Mapping, Sequence

from lingua_sweep import clusters as cluster_lib
from lingua_sweep.errors import UserError
from lingua_sweep.sweep import clock, faultpoint
from lingua_sweep.sweep import limits as limits_lib
from lingua_sweep.sweep.forecast import Forecaster
from lingua_sweep.sweep.journal import JobEntry
from lingua_sweep.sweep.shape import job_shape, room
from lingua_sweep.sweep.states import QUEUED, SUBMITTING, WAITING, not_soon, pending_words

log = logging.getLogger(__name__)


def assign(
    n_queued: int,
    rooms: Mapping[str, int],
    order: Sequence[str],
    *,
    queue_on: str | None,
    when_busy: str,
    caps: Mapping[str, int | None] | None = None,
    too_big: Sequence[Mapping[str, str]] | None = None,
) -> list[str | None]:
    """The cluster for each of the first n queued jobs (None: keep waiting here).

    Clusters with room fill in priority order (`order`); the rest follow `when_busy`: `queue`
    sends them to `queue_on` (the first reachable cluster that fits them), `wait` keeps them.
    `caps`: how many more jobs each cluster's submit limit accepts (None: no limit); a job
    no cluster may take now waits here. `too_big`: per job, the clusters whose GPUs it does not
    fit (never its target).
    """
    left = dict(rooms)
    cap = {n: v for n, v in (caps or {}).items() if v is not None}
    out: list[str | None] = []
    for i in range(n_queued):
        skip = too_big[i] if too_big else {}
        target = next((n for n in order if left.get(n, 0) > 0 and cap.get(n, 1) > 0
                       and n not in skip), None)  # fmt: skip
        fallback = queue_on if queue_on not in skip else next(
            (n for n in order if n not in skip), None)  # fmt: skip
        if target is not None:
            left[target] -= 1
        elif when_busy == "queue" and fallback is not None and cap.get(fallback, 1) > 0:
            target = fallback
        if target is not None and target in cap:
            cap[target] -= 1
        out.append(target)
    return out


def within_caps(targets: list[str | None], caps: Mapping[str, int | None]) -> list[str | None]:
    """Targets past a cluster's submit limit wait here instead."""
    left = {n: v for n, v in caps.items() if v is not None}
    out = []
    for target in targets:
        if target in left:
            if left[target] <= 0:
                target = None
            else:
                left[target] -= 1
        out.append(target)
    return out


def check_when_busy(
    n_without_room: int, n_jobs: int, reachable: Sequence[str], when_busy: str
) -> None:
    if when_busy == "fail" and n_without_room:
        raise UserError(
            f"{n_without_room} of {n_jobs} jobs find no room on {list(reachable)}; set "
            "hydra.launcher.when_busy=queue (queue them) or wait (hold them until room appears)"
        )


def should_move(
    pending_s: float, moves: int, max_pending_s: float | None, other_rooms: Mapping[str, int]
) -> bool:
    """A job waiting too long in one queue moves once, and only where a job can start now."""
    if max_pending_s is None or moves >= 1 or pending_s < max_pending_s:
        return False
    return any(r > 0 for r in other_rooms.values())


class Dispatcher:
    """The controller's placement: probes, counts room within limits, sends queued jobs to
    clusters (controller.submit) and moves those that wait in vain. Journal writes go through
    the controller."""

    def __init__(self, controller):
        self.c = controller
        self.last_probe = -1e9
        self.probed_at = 0.0  # on the journal's clock (clock.now)
        self.forecaster = Forecaster(controller)
        self.last_replan = -1e9

    def probe(self) -> None:
        c = self.c
        if clock.monotonic() - self.last_probe < c.p.probe_every_s:
            return
        links = [link for link in c.links.values() if link.available]
        # A simulated cluster answers for itself; the others are probed in parallel (sinfo).
        own = [link for link in links if hasattr(link.backend, "probe")]
        real = [link for link in links if link not in own]
        statuses = cluster_lib.probe([link.config for link in real], c.p.probe_timeout_s)
        for link, status in zip(real, statuses, strict=True):
            link.status = status
        for link in own:
            link.status = link.backend.probe(c.p.probe_timeout_s)
        self.last_probe = clock.monotonic()
        self.probed_at = clock.now()  # on the journal's clock

    def rooms(self) -> dict[str, int]:
        """Jobs each cluster can start now, within the user's limits there, minus ours already
        waiting in its queue."""
        c, out = self.c, {}
        # Jobs moving to a cluster (stopped here, or back in the queue bound for it) take its
        # room before anyone else: two moves never count on one free node.
        bound: dict[str, int] = {}
        for j in [*c.jobs(QUEUED), *(j for j in c.open_jobs() if j.stopping)]:
            to = j.target if j.state == QUEUED else j.stopping.get("to")
            if to:
                bound[to] = bound.get(to, 0) + 1
        for name, link in c.links.items():
            cfg = link.config
            if not link.available or link.status is None:
                continue
            if not cfg.slurm:
                running = [j for j in c.open_jobs() if j.cluster == name]
                out[name] = max(c.p.local_parallel, 1) - len(running)
                continue
            free = self.free_within_limits(name)
            # Ours that the probe may not have seen take room first: those waiting, and those
            # submitted or seen starting since (sinfo may have counted their nodes as free).
            unseen = [
                j for j in self._ours_on(name)
                if j.state in WAITING
                or max(j.submitted_at or 0.0, j.started_at or 0.0) > self.probed_at
            ]  # fmt: skip
            out[name] = max(0, free - len(unseen) - bound.get(name, 0))
        return out

    def rooms_for_moves(self) -> dict[str, int]:
        """The rooms a pending job may move into: what the jobs still waiting here leave, in
        the clusters' order. They take room first, at the next dispatch (a job moved into a
        slot that one of them took waited a whole run behind it), and only room Slurm does not
        hold (a reservation's idle nodes took none of them)."""
        rooms = self.forecaster.slurm.usable(self.rooms())
        held = sum(1 for j in self.c.jobs(QUEUED) if j.target not in self.c.links)
        for name in rooms:
            taken = min(held, max(rooms[name], 0))
            rooms[name] -= taken
            held -= taken
        return rooms

    def free_within_limits(self, name: str) -> int:
        """Jobs of the sweep's shape that sinfo shows room for there, within the user's
        limits."""
        link = self.c.links[name]
        free = room(link.status, link.config, job_shape(link.config, self.c.p))
        start = self.headroom(name).start
        return free if start is None else min(free, start)

    def _ours_on(self, name: str) -> list[JobEntry]:
        c = self.c
        return [j for j in c.open_jobs() + c.jobs(SUBMITTING) if j.cluster == name]

    def headroom(self, name: str) -> limits_lib.Headroom:
        """What the user's limits on this cluster leave for this sweep now."""
        c = self.c
        link = c.links[name]
        if link.limits is None:
            return limits_lib.Headroom(start=None, submit=None)
        ours = self._ours_on(name)
        shape = job_shape(link.config, c.p)
        return limits_lib.headroom(
            link.limits, limits_lib.Usage(**(link.usage or {})),
            ours_running=sum(j.state == "RUNNING" for j in ours), ours_active=len(ours),
            gpus_per_job=shape.nodes * shape.gpus_per_node,
        )  # fmt: skip

    def reachable_slurm(self) -> list[str]:
        c = self.c
        return [
            n for n, link in c.links.items()
            if link.config.slurm and link.available and link.status is not None
            and link.status.state in ("idle", "busy")
            and job_shape(link.config, c.p).nodes <= link.config.max_nodes
        ]  # fmt: skip

    def dispatch(self) -> None:
        c = self.c
        queued = sorted(c.jobs(QUEUED), key=lambda j: j.index)
        if not queued or c.composer is None or c.state.cancel_requested:
            return
        unusable = [link.unusable for link in c.links.values() if link.unusable]
        if len(unusable) == len(c.links):
            raise UserError(unusable[0])
        # A moved or resubmitted job goes where it was sent, and nowhere else: one array per
        # cluster (a thousand preempted jobs are not a thousand cycles).
        for target in dict.fromkeys(j.target for j in queued if j.target in c.links):
            bound = [j for j in queued if j.target == target]
            cap = self.headroom(target).submit
            if cap == 0:
                continue
            if not c.registry[target].slurm:
                bound = bound[:1]  # one process each
            size = min(cap or len(bound), c.links[target].array_limit or len(bound))
            c.submit(c.links[target], bound[:size])
        queued = [j for j in queued if j.target not in c.links]
        if not queued:
            return
        self.probe()
        rooms = self.rooms()
        reachable = self.reachable_slurm()
        local_ok = self._local_ok(reachable)
        order = [n for n in c.names if n in rooms and (c.registry[n].slurm or local_ok)]
        queue_on = reachable[0] if reachable else None
        if not reachable and not any(not c.registry[n].slurm for n in order):
            if not c.submitted_any:
                statuses = [link.status for link in c.links.values() if link.status]
                reasons = "; ".join(f"{s.name}: {s.reason or s.state}" for s in statuses)
                raise UserError(
                    f"no cluster can take the sweep ({reasons}); check `lingua-sweep clusters`"
                )
            return  # every cluster is away for now: the jobs wait for one to come back
        caps = {n: self.headroom(n).submit for n in order}
        too_big = [getattr(c.configs.get(j.index), "too_big_for", None) or {} for j in queued]
        if c.p.placement == "time_to_result":
            self.forecaster.slurm.ask(order, rooms)
            targets = self.forecaster.place(queued, rooms, order, queue_on, too_big)
            targets = within_caps(targets, caps)
        else:
            targets = assign(len(queued), rooms, order, queue_on=queue_on,
                             when_busy=c.p.when_busy, caps=caps, too_big=too_big)  # fmt: skip
        if not c.submitted_any:
            check_when_busy(targets.count(None), len(queued), reachable, c.p.when_busy)
        for name in dict.fromkeys(t for t in targets if t):
            share = [j for j, t in zip(queued, targets, strict=True) if t == name]
            if c.registry[name].slurm:
                # One array per call, within the cluster's MaxArraySize; the rest next cycle.
                c.submit(c.links[name], share[: c.links[name].array_limit])
            else:  # one process each: a kill between two of them loses nothing
                for job in share:
                    c.submit(c.links[name], [job])
        if c.p.placement == "time_to_result":
            self.forecaster.journal_placed()

    def _local_ok(self, reachable: list[str]) -> bool:
        """Whether jobs may run on this machine now: when no Slurm cluster is reachable, and
        either the user named `local` or this sweep never ran on Slurm (a laptop without one).
        A sweep that ran on a cluster never falls back here in a network blip: on this
        machine's data, its results would not be comparable."""
        c = self.c
        if reachable:
            return False
        named = {*(c.p.clusters or []), *([c.p.cluster] if c.p.cluster else [])}
        if any(not c.registry[n].slurm for n in named):
            return True
        return not any(cl in c.registry and c.registry[cl].slurm
                       for cl, _ in c.state.known_ids)  # fmt: skip

    def move_long_pending(self) -> None:
        c = self.c
        if c.composer is None:
            return
        if c.p.placement == "time_to_result" and c.jobs("PENDING"):
            self.move_to_sooner()
        if c.p.max_pending_s is None:
            return
        now = clock.now()
        seen = c.watcher.pending_seen  # judged on what Slurm said, never on a stale picture
        # A job held by a limit, a partition rule or missing nodes will not start by waiting
        # its turn: it may move at once (unless time-to-result judges its wait: its turn behind
        # our own jobs there); any other after max_pending_s.
        stuck = [
            j for j in c.jobs("PENDING")
            if j.started_at is None and j.moves == 0 and j.submitted_at and not j.stopping
            and j.index in seen and (seen[j.index] - j.submitted_at >= c.p.max_pending_s
                                     or (not_soon(j.reason) and not self._judged(j)))
        ]  # fmt: skip
        if not stuck:
            return
        self.probe()
        rooms = self.rooms_for_moves()
        for job in stuck:
            others = {n: r for n, r in rooms.items() if n != job.cluster and c.registry[n].slurm}
            waited = math.inf if not_soon(job.reason) else now - job.submitted_at
            if not should_move(waited, job.moves, c.p.max_pending_s, others):
                continue
            target = next(n for n, r in others.items() if r > 0)
            if self._judged(job) and self.forecaster.sooner_here(job, target, rooms):
                continue
            rooms[target] -= 1
            why = pending_words(job.reason) if not_soon(job.reason) else None
            self._move(job, target, f"pending {now - job.submitted_at:.0f}s "
                       f"({why or 'waiting its turn'}) while {target} has room")  # fmt: skip

    def _judged(self, job: JobEntry) -> bool:
        """Whether time-to-result placement predicts this job's finish where it waits."""
        return (self.c.p.placement == "time_to_result"
                and self.forecaster.run_s(job.index, job.cluster) is not None)  # fmt: skip

    def move_to_sooner(self) -> None:
        """Time-to-result: a pending job moves where it would finish clearly sooner (judged
        once per probe, on Slurm's latest estimates)."""
        if clock.monotonic() - self.last_replan < self.c.p.probe_every_s:
            return
        self.last_replan = clock.monotonic()
        self.probe()
        rooms = self.rooms_for_moves()
        for job, target, why in self.forecaster.moves(rooms, self.reachable_slurm()):
            self._move(job, target, why)

    def _move(self, job: JobEntry, target: str, note: str) -> None:
        log.info("#%d %s: moving it", job.index, note)
        # Moved (and bound for the target) once Slurm confirms it ended here unstarted.
        self.c.record("stop", index=job.index, cluster=job.cluster, job_id=job.job_id,
                      status="MOVE", note=note, to=target)  # fmt: skip
        faultpoint.hit("stop.recorded")
