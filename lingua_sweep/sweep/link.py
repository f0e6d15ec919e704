"""A cluster as the controller sees it: its backend, its last probe, whether it answers, and a
worker thread of its own, so that a slow or hung cluster never stalls the others.

Calls to one cluster run in order on its thread (`start`); their results are applied in the
launcher's main thread (`collect`), the only one that writes the journal.
"""

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from lingua_sweep import clusters as cluster_lib
from lingua_sweep.config import ClusterConfig
from lingua_sweep.sweep import clock
from lingua_sweep.sweep.backends import Backend
from lingua_sweep.sweep.limits import Limits

BACKOFF_MAX_S = 60.0
REFUSAL_BACKOFF_MAX_S = 300.0
LIMITS_EVERY_S = 300.0  # limits change rarely; a refusal re-reads them at once


@dataclass
class Link:
    """One cluster; its worker thread is a daemon, so an exit never waits on a hung call."""

    config: ClusterConfig
    backend: Backend
    status: cluster_lib.ClusterStatus | None = None
    unusable: str | None = None  # a reason this sweep cannot use it at all (its data is missing)
    down_until: float = 0.0
    failures: int = 0
    reason: str | None = None  # why it is down, for the live view and status
    # The user's Slurm limits there (read before the first submission, then now and then) and
    # the user's other jobs (each poll): room is counted within them.
    limits: Limits | None = None
    limits_read_at: float = -1e9
    usage: dict[str, Any] | None = None
    # sbatch refused for a reason that passes (a submit limit): no submission before this.
    submit_after: float = 0.0
    refusals: int = 0
    max_array: int | None = None  # learned from a refusal of an array's size
    # sbatch calls of ours there in flight, and when the last one ended (monotonic): a Slurm
    # answer asked meanwhile may count our new jobs, which sinfo's room did not
    sbatching: int = 0
    sbatch_done_at: float = -1e9
    ops: list[tuple[Future, Callable, str]] = field(default_factory=list)  # (.., then, kind)
    _queue: queue.Queue | None = None

    def down(self, reason: str, poll_s: float) -> None:
        self.failures += 1
        self.reason = reason
        self.down_until = clock.monotonic() + min(BACKOFF_MAX_S, poll_s * 2**self.failures)

    def up(self) -> None:
        self.failures, self.reason, self.down_until = 0, None, 0.0

    def refused(self, poll_s: float) -> float:
        """A transient refusal: submissions wait, twice as long each time in a row (capped)."""
        self.refusals += 1
        wait = min(REFUSAL_BACKOFF_MAX_S, poll_s * 2**self.refusals)
        self.submit_after = clock.monotonic() + wait
        return wait

    @property
    def can_submit(self) -> bool:
        return self.available and not self.busy and clock.monotonic() >= self.submit_after

    @property
    def array_limit(self) -> int | None:
        known = [n for n in (self.max_array, self.limits and self.limits.max_array) if n]
        return min(known) if known else None

    @property
    def available(self) -> bool:
        return self.unusable is None and clock.monotonic() >= self.down_until

    @property
    def busy(self) -> bool:
        return any(not f.done() for f, _, _ in self.ops)

    @property
    def polling(self) -> bool:
        return any(kind == "poll" and not f.done() for f, _, kind in self.ops)

    def sbatch(self, work: Callable[[], Any]) -> Any:
        """A submission, on this cluster's thread, marked while it runs."""
        self.sbatching += 1
        try:
            return work()
        finally:
            self.sbatching -= 1
            self.sbatch_done_at = clock.monotonic()

    def quiet_since(self, t: float) -> bool:
        """Whether no sbatch of ours ran there since monotonic time t."""
        return not self.sbatching and self.sbatch_done_at < t

    def start(self, work: Callable[[], Any], then: Callable[[Any], None], kind: str = "") -> None:
        """Runs work() on this cluster's thread, after the calls started before it;
        then(result) runs in the main thread when `collect` finds it done."""
        future: Future = Future()
        self.ops.append((future, then, kind))
        if clock.virtual():  # calls take no time there: run now, in order (the same every run)
            _run(work, future)
            return
        if self._queue is None:
            self._queue = queue.Queue()
            threading.Thread(target=self._worker, daemon=True, name=self.config.name).start()
        self._queue.put((work, future))

    def _worker(self) -> None:
        while True:
            work, future = self._queue.get()
            _run(work, future)

    def collect(self, wait: bool = False) -> None:
        while self.ops and (wait or self.ops[0][0].done()):
            future, then, _ = self.ops.pop(0)
            then(future.result())


def _run(work: Callable[[], Any], future: Future) -> None:
    try:
        future.set_result(work())
    except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
        future.set_exception(e)
