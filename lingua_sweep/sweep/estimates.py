"""Slurm's word on where a job would start, fetched in the background for time-to-result
placement: `sbatch --test-only` for a job submitted now on each cluster, the idle nodes Slurm
holds (reservations, `held`), and, once per cluster, how much of their time limits other
users' jobs used lately (`sacct`), Slurm's lateness before the sweep has seen starts of its own.
A hung login node delays none of it: each call runs on a daemon thread with its deadline.
"""

import logging
import threading
from typing import Any

from lingua_sweep.sweep import clock
from lingua_sweep.sweep import placement as pl
from lingua_sweep.sweep.held import HeldRoom
from lingua_sweep.sweep.shape import sbatch_params

log = logging.getLogger(__name__)
TEST_ONLY_NAME = "lingua-sweep-test-only"


class Estimates:
    def __init__(self, controller, observed: pl.Observed):
        self.c = controller
        self.observed = observed  # its `prior` is filled here
        # cluster -> (Slurm's start for a job submitted now, when asked), asked while it had
        # no room (an answer for a cluster with room speaks of that room, not of the next job
        # beyond it: a third job was queued on one into a cluster that two had just filled);
        # refreshed each probe.
        self.estimates: dict[str, tuple[float | None, float]] = {}
        self.held_room = HeldRoom(controller)  # idle nodes Slurm holds
        self.in_flight: dict[str, threading.Event] = {}  # set when its answer is in
        self.history_asked: set[str] = set()  # clusters whose job history was asked for
        self.awaited: set[str] = set()  # clusters whose first answer a placement waited for
        self.asked: dict[str, float] = {}  # cluster -> when last asked (monotonic)
        self.asked_with_room: dict[str, bool] = {}  # cluster -> whether it had room then

    def ask(self, names: list[str], rooms: dict[str, int]) -> None:
        """`sbatch --test-only` on each cluster, those with room too (their idle nodes may be
        held), on a daemon thread: neither the loop nor the launcher's exit waits on a hung
        login node (each call has its deadline; a later probe asks again)."""
        c = self.c
        for name in names:
            link = c.links[name]
            if name in self.in_flight or not link.config.slurm or not link.available:
                continue
            room = rooms.get(name, 0)
            # Once a probe; at once where room came or went since (an estimate from before a
            # cluster had room is stale when it fills again).
            if (clock.monotonic() - self.asked.get(name, -1e9) < c.p.probe_every_s
                    and self.asked_with_room.get(name) == (room > 0)):  # fmt: skip
                continue
            self.asked[name], self.asked_with_room[name] = clock.monotonic(), room > 0
            params = sbatch_params(link.config, c.p, TEST_ONLY_NAME)
            self.in_flight[name] = threading.Event()
            clock.start_thread(self._estimate, name, link, params, room, name=f"estimate-{name}")

    def _estimate(self, name: str, link, params: dict[str, Any], room: int = 0) -> None:
        asked, began, backend = clock.now(), clock.monotonic(), link.backend
        try:
            start = backend.estimate_start(params)
        except Exception as e:  # noqa: BLE001 - an estimate is advice: without one, none
            log.debug("cluster %s: no start estimate (%s)", name, e)
            start = None
        # Where an estimate is used (no room), with the cluster's job history: sacct over two
        # days of a busy cluster is no call to make where it would not be used.
        history = start is not None and room <= 0 and name not in self.history_asked
        if history:  # the first placement waits for it (within the probe's timeout)
            self.history_asked.add(name)
        if room <= 0:
            self.estimates[name] = (start, asked)  # in use at once, even while sacct is slow
        else:
            self.estimates.pop(name, None)  # from before it had room: stale when it fills
        if room > 0:  # sinfo showed room: is Slurm keeping it for a reservation?
            self.held_room.read_reservations(name, backend, params)
        if room > 0 and link.quiet_since(began):
            # sinfo showed room: the answer tells whether it is held. (An sbatch of ours landing
            # meanwhile takes that room itself: then nothing is learnt.)
            self.held_room.note_test_only(name, start, asked)
        if history:
            self._history(name, backend, params.get("partition"))
        self.in_flight.pop(name).set()

    def _history(self, name: str, backend, partition: str | None) -> None:
        """How late Slurm's estimates there are before this sweep sees a start: how much of
        their time limits other users' jobs used lately. (On Slurm's word alone, a sweep's
        first placements saw research-secure 4,700 s away; it started our jobs at ~1,400 s.)"""
        try:
            used = backend.others_time_used(partition)
        except Exception as e:  # noqa: BLE001 - advice too
            log.debug("cluster %s: no job history (%s)", name, e)
            return
        if used is not None:
            self.observed.prior[name] = used
            log.info("cluster %s: other users' jobs used %.0f%% of their time limits lately; "
                     "Slurm's start estimates there are scaled by that until this sweep sees "
                     "starts", name, 100 * used)  # fmt: skip

    def usable(self, rooms: dict[str, int]) -> dict[str, int]:
        """The rooms sinfo shows, less what Slurm holds (the safety net moved four jobs into a
        maintenance reservation's idle nodes)."""
        return {n: self.held_room.usable_room(n, r) for n, r in rooms.items()}

    def next_start(self, name: str) -> float | None:
        """Slurm's start (epoch) for a job beyond the room sinfo shows there."""
        if (until := self.held_room.until(name)) is not None:
            return until
        return self.estimates.get(name, (None,))[0]

    def await_first(self, names: list[str], timeout_s: float) -> None:
        """At a sweep's first placement, the estimates it needs, with the clusters' job
        history (within the probe's timeout). Once per cluster: a hung login node must not
        stall every later placement (alpha's results were journaled 33 s late while beta's
        `--test-only` hung)."""
        deadline = clock.monotonic() + timeout_s
        for name in names:
            event = self.in_flight.get(name)
            if event is not None and name not in self.awaited:
                self.awaited.add(name)
                event.wait(max(deadline - clock.monotonic(), 0.0))
