"""Where each job finishes first (`hydra.launcher.placement=time_to_result`): a predicted finish
per cluster, predicted start + predicted run time, and the placements and moves that follow.

Start: now where the cluster has room; else Slurm's own estimate (`sbatch --test-only` for a job
not yet submitted, `squeue --start` for one pending) scaled by how Slurm's estimates compared
with the starts this sweep saw on that cluster (or, before three there, on its others) and with
the waits so far of the jobs still waiting: Slurm assumes every running job runs to its time
limit, and people ask for more time than they use, so its estimates come out late. Beyond the
next start, a cluster frees a job-sized slot every run time / the jobs it holds at once.

Run time: a job's size over a cluster's speed. A trainer job's size is its training FLOPs per GPU
(`compose.JobConfig.work_flops`); another app's is `expected_run_s` on an H100 node, or, without
that, one job. A cluster's speed is what this sweep's finished jobs achieved there; before any
finished there, the GPU table's figure (`lingua_sweep.gpus`, or the cluster's
`model_flops_per_s`), scaled by how the sweep's jobs compared with the table elsewhere.

Pure functions and small classes over plain numbers: the dispatcher does the I/O.
"""

import heapq
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lingua_sweep.config import ClusterConfig
from lingua_sweep.gpus import gpu_spec

# Finishes within 5% of each other are alike: the team's priority order decides.
TIE = 0.05
# A pending job moves only where it finishes this much sooner (of its predicted finish here), so
# that jobs do not bounce between queues on noisy estimates.
MOVE_GAIN = 0.25
MIN_SAMPLES = 3  # starts seen on a cluster before they correct Slurm's estimates there
RECENT = 50  # the latest observations count: queues and nodes change over a day
REFERENCE_GPU = "H100"  # what `expected_run_s` is measured on
BIAS_RANGE = (0.05, 4.0)  # how far Slurm's estimates are corrected, at most
OVERRUN = 0.1  # of its predicted run time: when a job past it is still expected to end
# A wait longer than anything seen is expected to last as long again (the Lindy rule): without
# it a job past every prediction is always about to start, and nothing moves it.
LINDY = 2.0


def table_flops(cluster: ClusterConfig) -> float | None:
    """The FLOP/s per GPU the trainer achieves on this cluster, from its config or GPU type."""
    if cluster.model_flops_per_s:
        return cluster.model_flops_per_s
    spec = gpu_spec(cluster.gpu_type)
    return spec.model_flops_per_s if spec else None


def job_size(work_flops: float | None, expected_run_s: float | None) -> tuple[float, bool]:
    """(size, in FLOPs?): a trainer job's FLOPs per GPU, an app's expected H100 seconds as
    FLOPs, or one job (sizes then compare only through what clusters were seen to do)."""
    if work_flops:
        return work_flops, True
    if expected_run_s:
        return expected_run_s * gpu_spec(REFERENCE_GPU).model_flops_per_s, True
    return 1.0, False


@dataclass
class Observed:
    """What this sweep has seen on each cluster: speeds (size per second of run) and how late
    Slurm's start estimates were (actual wait / estimated wait), with the jobs still waiting."""

    speeds: dict[str, list[float]] = field(default_factory=dict)
    bias: dict[str, list[float]] = field(default_factory=dict)
    # cluster -> lower bounds of the lateness of our jobs still waiting there (their wait so
    # far / Slurm's estimate), refreshed by the forecaster
    waiting: dict[str, list[float]] = field(default_factory=dict)
    # cluster -> the share of their time limits other users' jobs used there lately (sacct):
    # Slurm's lateness before this sweep has seen starts of its own
    prior: dict[str, float] = field(default_factory=dict)

    def add_run(self, cluster: str, size: float, run_s: float) -> None:
        if run_s > 0:
            self.speeds.setdefault(cluster, []).append(size / run_s)

    def add_start(self, cluster: str, asked_at: float, slurm_start: float, started: float):
        if (lateness := wait_ratio(asked_at, slurm_start, started)) is not None:
            self.bias.setdefault(cluster, []).append(lateness)

    def speed(self, cluster: str) -> float | None:
        seen = self.speeds.get(cluster, [])[-RECENT:]
        return statistics.median(seen) if len(seen) >= 1 else None

    def correction(self, cluster: str, waited: float = 0.0) -> float:
        """Slurm's lateness there: the median of what was seen, for a job that has already
        waited `waited` x Slurm's estimate the median of those that waited at least as long."""
        seen, waiting = self.bias.get(cluster, [])[-RECENT:], self.waiting.get(cluster, [])
        if len(seen) < MIN_SAMPLES:
            # Too few here: the lateness seen on the sweep's other clusters (people ask for
            # more time than they use everywhere), else none.
            seen = [b for runs in self.bias.values() for b in runs[-RECENT:]]
            waiting = [w for bounds in self.waiting.values() for w in bounds]
        if len(seen) < MIN_SAMPLES:
            # Nothing seen yet: as late as others' jobs end before their limits, else Slurm's
            # word as it is; either until the job is later than that.
            lateness = max(self.prior.get(cluster, 1.0), BIAS_RANGE[0])
            return max(lateness, LINDY * waited)
        lateness = censored_median(seen, waiting, above=waited)
        return min(max(lateness, BIAS_RANGE[0]), max(BIAS_RANGE[1], LINDY * waited))


def wait_ratio(asked_at: float, slurm_start: float, until: float) -> float | None:
    """A wait from `asked_at` until `until` over Slurm's estimate made then; None when Slurm
    said "now" (which says nothing about its lateness)."""
    estimated = slurm_start - asked_at
    return max(until - asked_at, 0.0) / estimated if estimated > 1.0 else None


def censored_median(seen: Sequence[float], waiting: Sequence[float], above: float = 0.0) -> float:
    """The median of a lateness from the values seen and lower bounds of those still waiting,
    among values above `above` (Kaplan-Meier). The starts alone are the lucky jobs: a sweep
    learnt 0.05 from its first four and then waited 0.3 for the next four; those still waiting
    are the late ones. Where more than half wait beyond every start seen, the largest bound; where
    nothing was seen above, LINDY x `above`."""
    values = sorted([(v, False) for v in seen if v > above or not above]
                    + [(v, True) for v in waiting if v > above or not above])  # fmt: skip
    at_risk, survive = len(values), 1.0
    for k, (value, censored) in enumerate(values):
        if not censored:
            survive *= 1.0 - 1.0 / at_risk
            if survive <= 0.5 + 1e-9:
                later = [v for v, c in values[k + 1 :] if not c]
                # Exactly half: midway to the next, as the median of an even count is.
                return (value + later[0]) / 2 if survive > 0.5 - 1e-9 and later else value
        at_risk -= 1
    return max(values[-1][0] if values else 0.0, LINDY * above)


def run_seconds(
    size: float, in_flops: bool, cluster: str, observed: Observed, table: Mapping[str, float | None]
) -> float | None:
    """A job's predicted run time on a cluster; None when nothing is known of it there."""
    seen = observed.speed(cluster)
    if seen:
        return size / seen
    flops = table.get(cluster)
    if not flops:
        return None
    # The sweep's own jobs against the table where they ran: a model smaller than the default
    # preset, another MFU, a slower filesystem.
    ratios = [s / table[c] for c in observed.speeds if table.get(c) and (s := observed.speed(c))]
    if ratios:
        return size / (flops * statistics.median(ratios))
    return size / flops if in_flops else None


def remaining_s(run_s: float, elapsed_s: float) -> float:
    """When a running job is expected to end. One that ran past its prediction ends soon, not
    now: its slot is no free node to move a job to (three jobs were moved onto one)."""
    return max(run_s - elapsed_s, OVERRUN * run_s)


@dataclass(kw_only=True)
class Outlook:
    """One cluster, as placement sees it now (times in seconds from now)."""

    name: str
    room: int  # jobs that start now
    next_start_s: float | None  # when the next job beyond `room` starts (corrected); None: unknown
    run_s: float | None  # a job's predicted run time there
    frees_s: list[float] = field(default_factory=list)  # when each of our running jobs ends
    # Our jobs waiting in its queue, in order: when Slurm says each starts, or None where it
    # gives no estimate (held by our own limit): those start as our jobs there end.
    pending_s: list[float | None] = field(default_factory=list)
    # How many more of our jobs a limit of ours lets run there (MaxJobsPerUser...), None: no
    # limit. Under a limit a job of ours that ends hands its slot to our next one; without
    # one its nodes go to whoever is first in the queue, and our later jobs start as the queue
    # drains, `capacity` such jobs at a time.
    headroom: int | None = None
    capacity: int = 1
    # (from, until): when reservations keep a job of ours off every node there; a slot that
    # opens then opens at `until`.
    blackout: tuple[float, float] | None = None
    # No idle node there that a job of ours could take: a node one of ours frees goes to the
    # first in the queue, so a turn of ours under our limit is no turn to wait for here (a job
    # held here for one lost it to another user's job queued there).
    full: bool = False

    @property
    def limited(self) -> bool:
        return self.headroom is not None


@dataclass(frozen=True)
class Choice:
    cluster: str | None
    start_s: float
    finish_s: float
    alternatives: dict[str, float]  # other cluster -> predicted finish there (s from now)
    # Its slot opens when one of our own jobs there ends, under our limit: no place in a Slurm
    # queue to hold, so the job waits here and is placed afresh when a slot frees.
    own_turn: bool = False


class Plan:
    """List scheduling over every cluster's predicted free slots: each job takes the slot that
    finishes it first; ties go to the earlier cluster in priority order."""

    def __init__(self, outlooks: Sequence[Outlook], n_jobs: int = 1):
        self.order = [o.name for o in outlooks]
        self.limited = {o.name: o.limited for o in outlooks}
        self.run = {o.name: o.run_s for o in outlooks}
        self.blackout = {o.name: o.blackout for o in outlooks}
        # cluster -> whether a slot of our own there passes to our next job waiting here
        self.own = {o.name: o.limited and not o.full for o in outlooks}
        known = [r for r in self.run.values() if r is not None]
        # A cluster with no speed known at all is taken to be as slow as the slowest known one;
        # with none known anywhere, jobs compare by start alone.
        self.fallback_run = max(known) if known else None
        # cluster -> heap of (when a slot frees, whether it is our own job's under our limit)
        self.slots: dict[str, list[tuple[float, bool]]] = {}
        self.pending_starts: dict[str, list[float]] = {}  # cluster -> its waiting jobs' starts
        for o in outlooks:
            slots = [(0.0, False)] * max(o.room, 0)
            slots += [(f, self.own[o.name]) for f in o.frees_s] if o.limited else []
            # A saturated cluster frees one job-sized slot every run / capacity.
            gap = (self._run(o.name) or 0.0) / max(o.capacity, 1)
            more = n_jobs + len(o.pending_s)
            if o.room > 0 and not o.limited and gap > 0:
                # Free nodes now, so nobody waits there: the next ones free as the cluster
                # turns over. A guess, not a queue place: those jobs wait here and are placed
                # afresh (perhaps into that room) when it is there.
                slots += [(k * gap, True) for k in range(1, more + 1)]
            elif o.next_start_s is not None:
                # Slurm's start for one more job, then one more as the cluster turns over.
                first = max(o.next_start_s, 0.0)
                if o.headroom is not None:  # no more than our limit lets run
                    more = min(more, max(o.headroom - o.room, 0))
                slots += [(first + k * gap, False) for k in range(more)]
            slots = [(self._clear(o.name, t), own) for t, own in slots]
            heapq.heapify(slots)
            self.slots[o.name] = slots
            starts = self.pending_starts[o.name] = []
            for start in o.pending_s:
                if start is not None:  # Slurm's (its estimate of a new job counts this one)
                    starts.append(self._clear(o.name, max(start, 0.0)))
                    if o.limited:  # it holds one of our limit's slots, then hands it on
                        if slots:
                            heapq.heappop(slots)
                        run = self._run(o.name)
                        end = math.inf if run is None else self._clear(o.name, starts[-1] + run)
                        heapq.heappush(slots, (end, self.own[o.name]))
                elif slots:  # behind our own limit (or its turn in the queue): the next slot
                    starts.append(slots[0][0])
                    self.take(o.name)
                else:
                    starts.append(math.inf)

    def _clear(self, name: str, t: float) -> float:
        """When a slot that opens at t can take a job of ours: after a reservation it falls in."""
        window = self.blackout[name]
        return window[1] if window is not None and window[0] < t < window[1] else t

    def _run(self, name: str) -> float | None:
        run = self.run[name]
        return self.fallback_run if run is None else run

    def finishes(self, among: Iterable[str] | None = None) -> dict[str, tuple[float, float]]:
        """cluster -> (start, finish) of its next free slot."""
        names = self.order if among is None else [n for n in self.order if n in set(among)]
        return {n: (self.slots[n][0][0], self.slots[n][0][0] + (self._run(n) or 0.0))
                for n in names if self.slots[n]}  # fmt: skip

    def best(self, among: Iterable[str] | None = None) -> Choice:
        options = {n: sf for n, sf in self.finishes(among).items() if math.isfinite(sf[0])}
        if not options:  # no room, no estimate, no end of ours in sight anywhere
            return Choice(None, math.inf, math.inf, {})
        fastest = min(finish for _, finish in options.values())
        name = next(n for n, (_, finish) in options.items() if finish <= fastest * (1 + TIE))
        start, finish = options[name]
        others = {n: round(f, 1) for n, (_, f) in options.items() if n != name}
        return Choice(name, start, finish, others, own_turn=self.slots[name][0][1])

    def take(self, name: str) -> None:
        (start, _), run = heapq.heappop(self.slots[name]), self._run(name)
        if self.limited[name] or (start == 0.0 and run is None):
            # Our own slot: it passes to our next job when this one ends (at an unknown time
            # when nobody knows its run time). Elsewhere the cluster's turnover is the slots.
            end = math.inf if run is None else self._clear(name, start + run)
            heapq.heappush(self.slots[name], (end, self.own[name]))


def place(plan: Plan, allowed: Sequence[Iterable[str] | None]) -> list[Choice]:
    """Where each queued job (in order) finishes first, among the clusters it may go to (None:
    any).

    The slots are chosen in list order; among jobs that may go to the same clusters, the
    earlier job gets the earlier start: the first job would otherwise wait for its best slot
    cycle after cycle while later ones took the free nodes (job 13 of 24 started last).
    """
    out = []
    for among in allowed:
        choice = plan.best(among)
        if choice.cluster is not None:
            plan.take(choice.cluster)
        out.append(choice)
    groups: dict[frozenset | None, list[int]] = {}
    for k, among in enumerate(allowed):
        groups.setdefault(None if among is None else frozenset(among), []).append(k)
    for members in groups.values():
        by_start = sorted((out[k] for k in members), key=lambda c: (c.start_s, c.finish_s))
        for k, choice in zip(members, by_start, strict=True):
            out[k] = choice
    return out


def better_elsewhere(here_finish_s: float, plan: Plan, others: Iterable[str], *,
                     min_gain_s: float) -> Choice | None:  # fmt: skip
    """Where a job pending here would finish sooner by the move margin, or None."""
    choice = plan.best(others)
    if choice.cluster is None or not math.isfinite(here_finish_s):
        return None
    return choice if clear_gain(here_finish_s, choice.finish_s, min_gain_s=min_gain_s) else None


def clear_gain(here_finish_s: float, there_finish_s: float, *, min_gain_s: float) -> bool:
    """Whether finishing there instead of here gains the move margin."""
    return here_finish_s - there_finish_s >= max(MOVE_GAIN * here_finish_s, min_gain_s)
