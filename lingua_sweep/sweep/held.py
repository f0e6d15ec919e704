"""Idle nodes Slurm holds: sinfo calls them idle, yet a job of ours submitted now would not
start there (a maintenance reservation begins within its time limit, or the nodes are kept for a
bigger job). Two witnesses, both asked where sinfo shows room: the cluster's reservations
(`scontrol show reservation`), which decide wherever one covers its nodes, and `sbatch
--test-only`'s answer elsewhere.

--test-only alone is not enough: it plans the jobs a reservation holds ahead of the new one, so
it calls nodes a job could use until the reservation begins held too (on the testbed it told a
5-minute job 60 minutes, and Slurm started one like it at once; on the simulator time-to-result
left research-secure-sim's idle nodes to the dispatcher for 80 minutes before maintenance).
"""

import logging
from dataclasses import replace

from lingua_sweep.sweep import clock
from lingua_sweep.sweep.predictions import hhmm
from lingua_sweep.sweep.shape import job_shape, room

log = logging.getLogger(__name__)
# Slurm's "now" for a cluster with room comes within a second or two of when it was asked.
HELD_SLACK_S = 5.0


class HeldRoom:
    def __init__(self, controller):
        self.c = controller
        # cluster -> Slurm's start for a job there although sinfo showed idle nodes when asked
        self.by_test_only: dict[str, float] = {}
        # cluster -> the nodes reservations cover there: [from, until] (epoch), when a job of
        # ours cannot start on them (its time limit would run into the reservation)
        self.reserved: dict[str, dict[str, list[float]]] = {}
        self.told: dict[str, float] = {}  # cluster -> the reservation's end last logged

    def read_reservations(self, name: str, backend, params: dict) -> None:
        try:
            reserved = self.reserved[name] = backend.reserved_nodes(params)
        except Exception as e:  # noqa: BLE001 - advice: then sbatch --test-only's word
            log.debug("cluster %s: no reservations read (%s)", name, e)
            self.reserved.pop(name, None)
            return
        now = clock.now()
        kept = [until for start, until in reserved.values() if start < now < until]
        if kept and max(kept) != self.told.get(name):
            self.told[name] = max(kept)
            log.info("cluster %s: a reservation keeps %d of its nodes from a job submitted now "
                     "until ~%s", name, len(kept), hhmm(min(kept)))  # fmt: skip

    def note_test_only(self, name: str, start: float | None, asked: float) -> None:
        """sinfo showed room, yet Slurm says a job asked for now starts later: the room is not
        room until Slurm says "now" again."""
        if start is not None and start - asked > HELD_SLACK_S:
            if name not in self.by_test_only and self._by_reservations(name) is None:
                log.info("cluster %s: its idle nodes are held until ~%s (for a bigger job?); "
                         "jobs go there only if they finish first anyway", name,
                         hhmm(start))  # fmt: skip
            self.by_test_only[name] = start
        else:
            self.by_test_only.pop(name, None)

    def _by_reservations(self, name: str) -> tuple[int, float | None] | None:
        """(the room a job of ours submitted now has there on nodes no reservation keeps from
        it, when the first kept node frees (epoch)); None where no reservation covers the
        cluster's nodes, or none could be read."""
        reserved = self.reserved.get(name)
        link = self.c.links[name] if reserved else None
        status = link.status if link is not None else None
        if not reserved or status is None:
            return None
        names = {n.name for n in status.nodes}
        if not names & reserved.keys():
            return None
        now = clock.now()
        kept = {node: until for node, (start, until) in reserved.items()
                if node in names and start < now < until}  # fmt: skip
        left = replace(status, nodes=[replace(n, free_cpus=0, free_gpus=0) if n.name in kept
                                      else n for n in status.nodes])  # fmt: skip
        free = room(left, link.config, job_shape(link.config, self.c.p))
        return free, min(kept.values(), default=None)

    def blackout(self, name: str) -> tuple[float, float] | None:
        """(from, until) (epoch), when reservations keep a job of ours off every node of the
        cluster: a turn of ours that comes then comes at `until` (a job placed for its turn
        behind our own limit there an hour before a maintenance waited out the maintenance).
        None where some node stays open, or nothing is known."""
        reserved = self.reserved.get(name)
        status = self.c.links[name].status if reserved else None
        if not reserved or status is None or not status.nodes:
            return None
        windows = [reserved.get(node.name) for node in status.nodes]
        if any(w is None for w in windows):
            return None
        start, until = max(w[0] for w in windows), min(w[1] for w in windows)
        return (start, until) if start < until and until > clock.now() else None

    def usable_room(self, name: str, sinfo_room: int) -> int:
        """The room sinfo shows there (within the user's limits), less what Slurm holds."""
        if sinfo_room <= 0:
            return sinfo_room
        if (by_reservations := self._by_reservations(name)) is not None:
            return min(sinfo_room, by_reservations[0])
        return 0 if self.by_test_only.get(name, 0.0) > clock.now() else sinfo_room

    def until(self, name: str) -> float | None:
        """When a job of ours may use the idle nodes sinfo shows there (epoch), where Slurm
        holds every one of them; None where it holds none, or not all."""
        if (by_reservations := self._by_reservations(name)) is not None:
            free, until = by_reservations
            # (reservations are read only while sinfo shows room: an old read says nothing of
            # a cluster that has none now)
            link = self.c.links[name]
            shown = room(link.status, link.config, job_shape(link.config, self.c.p))
            return until if free == 0 and shown > 0 else None
        until = self.by_test_only.get(name, 0.0)
        return until if until > clock.now() else None

    def free_now(self, name: str) -> bool:
        """Whether sinfo shows room there for a job of ours now, within the user's limits,
        that Slurm does not hold."""
        link = self.c.links[name]
        if link.status is None or not link.config.slurm:
            return False
        return self.usable_room(name, self.c.dispatcher.free_within_limits(name)) > 0
