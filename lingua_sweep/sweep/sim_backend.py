"""A simulated cluster as the controller sees any cluster: `SimBackend` (the Backend protocol of
`backends.py`) over this process's one `SimCluster` per cluster name, and what they all did.
"""

import threading
import time
from dataclasses import asdict
from typing import Any

from lingua_sweep.clusters import ClusterStatus
from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError
from lingua_sweep.sweep import clock
from lingua_sweep.sweep.simulator import CLOCKS, SimCluster, SimSpec

_CLUSTERS: dict[str, SimCluster] = {}
_REGISTRY_LOCK = threading.Lock()


def cluster_for(config: ClusterConfig) -> SimCluster:
    """This process's simulated cluster of that name (made at first use)."""
    spec = SimSpec(**dict(config.simulated or {}))
    with _REGISTRY_LOCK:
        sim = _CLUSTERS.get(config.name)
        if sim is None or asdict(sim.spec) != asdict(spec):
            sim = _CLUSTERS[config.name] = SimCluster(config.name, spec)
        return sim


def choose_clock(clusters: list[ClusterConfig]) -> None:
    """Virtual time for a sweep whose clusters are all simulated and ask for it; before any
    simulated cluster or journal record is made."""
    asked = {c.name: (c.simulated or {}).get("clock", "wall") for c in clusters}
    for name, kind in asked.items():
        if kind not in CLOCKS:
            raise UserError(f"cluster {name}: simulated.clock={kind!r}: choose one of {CLOCKS}")
    virtual = sorted(n for n, kind in asked.items() if kind == "virtual")
    if not virtual:
        return
    real = sorted(c.name for c in clusters if c.simulated is None)
    wall = sorted(n for n, kind in asked.items() if kind == "wall" and n not in real)
    if real or wall:
        raise UserError(f"clusters {virtual} run on virtual time but {real + wall} on the wall "
                        "clock: a sweep has one clock; give every cluster of it "
                        "simulated.clock=virtual, or none")  # fmt: skip
    if not clock.virtual():
        # From a whole second: sums of the launcher's intervals stay exact, run after run.
        clock.use(clock.VirtualClock(start=float(int(time.time()))))


def report() -> dict[str, Any]:
    """What every simulated cluster of this process did: calls by kind, the simulator's own
    CPU, the most jobs of ours running at once."""
    with _REGISTRY_LOCK:
        sims = list(_CLUSTERS.values())
    return {
        s.name: {"calls": s.calls, "cpu_s": round(s.cpu_s, 3), "max_running": s.max_running,
                 "jobs": sum(1 for j in s.jobs.values() if j.user == "me")}
        for s in sims
    }  # fmt: skip


class SimBackend:
    files_here = True

    def __init__(self, cluster: ClusterConfig):
        self.cluster = cluster
        self.code: dict[str, Any] = {}
        self.sim = cluster_for(cluster)

    def prepare(self) -> None:
        pass

    def submit(self, tasks, *, folder, params, batch, fence):
        return self.sim.submit(tasks, folder=folder, params=params, batch=batch)

    def resolve(self, batch, fence, *, since=None, cancel=False):
        return {"ids": self.sim.find(batch, cancel=cancel)}

    def poll(self, request):
        return self.sim.poll(request)

    def cancel(self, ids):
        if ids:
            self.sim.cancel(ids)

    def fetch(self, remote_dir, local_dir):
        pass

    def missing(self, paths):
        return []  # a simulated cluster has whatever data it is asked for

    def limits(self, prefix):
        return self.sim.limits()

    def probe(self, timeout_s: float) -> ClusterStatus:
        return self.sim.probe()

    def estimate_start(self, params: dict) -> float | None:
        return self.sim.estimate(params)

    def reserved_nodes(self, params: dict) -> dict[str, list[float]]:
        return self.sim.reserved_nodes(params)

    def others_time_used(self, partition: str | None) -> float | None:
        return self.sim.others_time_used()
