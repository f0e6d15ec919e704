"""The cluster registry: loading definitions, detecting where we run, probing which are idle.

Cluster definitions are the YAML files of the Hydra group `conf/cluster/`, validated against
`ClusterConfig`. Lower `priority` is preferred.
"""

import fnmatch
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError
from lingua_sweep.sweep import remote

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO_ROOT / "conf" / "cluster"
SLURM_CONF_DEFAULT = Path("/etc/slurm/slurm.conf")


# --- loading -------------------------------------------------------------------------------


ONLY_ENV = "LINGUA_SWEEP_CLUSTERS"  # e.g. "mycluster,local": use only these


def user_cluster_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Your own cluster definitions, read by the launcher, the CLI and detection alike."""
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME", "~"), ".config")
    return Path(base).expanduser() / "lingua_sweep" / "clusters"


def load_clusters(
    extra_dirs: Iterable[str | Path] = (), environ: Mapping[str, str] = os.environ
) -> dict[str, ClusterConfig]:
    """Every cluster of conf/cluster/, your user dir, then extra dirs, by priority (then name).

    An extra dir is either a dir of cluster YAMLs or a Hydra searchpath root holding `cluster/`.
    A later definition of the same name replaces an earlier one. With LINGUA_SWEEP_CLUSTERS set,
    only the clusters it names (and `local`, the fallback of last resort) are known.
    """
    dirs = [CLUSTER_DIR]
    if user_cluster_dir(environ).is_dir():
        dirs.append(user_cluster_dir(environ))
    for d in map(Path, extra_dirs):
        dirs.append(d / "cluster" if (d / "cluster").is_dir() else d)
    clusters = {}
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"cluster definition dir {d} does not exist")
        for path in sorted(d.glob("*.yaml")):
            if path.stem != "cluster_schema":
                clusters[path.stem] = _load_one(path)
    only = [n.strip() for n in environ.get(ONLY_ENV, "").split(",") if n.strip()]
    if only:
        unknown = [n for n in only if n not in clusters]
        if unknown:
            raise UserError(
                f"{ONLY_ENV} names unknown cluster(s) {unknown}; known: {', '.join(clusters)}"
            )
        clusters = {n: c for n, c in clusters.items() if n in only or n == "local"}
    return dict(sorted(clusters.items(), key=lambda kv: (kv[1].priority, kv[0])))


def _load_one(path: Path) -> ClusterConfig:
    try:
        raw = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"invalid cluster definition {path}: {reason}") from None
    if not isinstance(raw, DictConfig):
        raise UserError(f"invalid cluster definition {path}: expected a mapping of keys, not a "
                        f"{type(raw).__name__}; see conf/cluster/*.yaml")  # fmt: skip
    try:
        raw.pop("defaults", None)  # Hydra's defaults list; the schema is applied here instead
        cfg = OmegaConf.merge(OmegaConf.structured(ClusterConfig), raw)
        if OmegaConf.is_missing(cfg, "name"):
            cfg.name = path.stem
        cluster = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        first_line = str(e).strip().splitlines()[0]
        raise UserError(f"invalid cluster definition {path}: {first_line}") from e
    if cluster.name != path.stem:
        raise UserError(f"{path}: name {cluster.name!r} must match the file name {path.stem!r}")
    return cluster


# --- detection -----------------------------------------------------------------------------


def is_slurm_machine(environ: Mapping[str, str], slurm_conf: Path = SLURM_CONF_DEFAULT) -> bool:
    """A Slurm job, or a machine configured for Slurm. An exported SLURM_CONF alone (a laptop
    pointed at some cluster's Slurm) does not make this machine one of that cluster's nodes."""
    in_job = "SLURM_JOB_ID" in environ or "SLURM_CLUSTER_NAME" in environ
    return in_job or slurm_conf.exists()


def detect_cluster(
    clusters: Mapping[str, ClusterConfig],
    environ: Mapping[str, str] = os.environ,
    hostname: str | None = None,
    slurm_machine: bool | None = None,
) -> str:
    """The name of the cluster this process runs on.

    LINGUA_CLUSTER, then Slurm's environment, then hostname patterns. On a machine without Slurm
    that matches nothing it is `local`; an unknown Slurm machine is an error, since guessing would
    put data and outputs in the wrong place.
    """
    names = ", ".join(clusters)
    forced = environ.get("LINGUA_CLUSTER")
    if forced:
        if forced not in clusters:
            raise UserError(f"LINGUA_CLUSTER={forced!r} is not a known cluster; known: {names}")
        return forced

    slurm_name = environ.get("SLURM_CLUSTER_NAME")
    if slurm_name in clusters:
        return slurm_name
    # sphinx and miso are one Slurm cluster with two partitions, so the partition decides,
    # when it belongs to exactly one cluster (Together's two clusters both call theirs `batch`).
    partition = environ.get("SLURM_JOB_PARTITION")
    by_partition = [c.name for c in clusters.values() if partition and c.partition == partition]
    if len(by_partition) == 1:
        return by_partition[0]

    hostname = hostname or socket.gethostname()
    candidates = {hostname, hostname.split(".")[0]}
    for cluster in clusters.values():  # in priority order
        if any(fnmatch.fnmatch(h, p) for p in cluster.hostname_patterns for h in candidates):
            return cluster.name

    if slurm_machine is None:
        slurm_machine = is_slurm_machine(environ)
    if not slurm_machine and "local" in clusters:
        return "local"
    seen = f"hostname {hostname!r}" + (f", SLURM_CLUSTER_NAME={slurm_name!r}" if slurm_name else "")
    raise UserError(
        f"cannot tell which cluster this is ({seen}); set LINGUA_CLUSTER to one of: {names}"
    )


# --- probing -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class NodeRoom:
    """What one node of the partition could still give a job now."""

    name: str
    state: str  # sinfo's short state: idle, mix, alloc, drain, down, idle*, ...
    free_cpus: int
    free_gpus: int


# Nodes in these states take new jobs (`*`: not responding, `~`: powered off, `#`: powering up).
# `plnd`: idle, but planned for a pending job (Slurm 22.05+): Slurm still starts a job there that
# ends before that one's start (on the testbed, a 5-minute job on nodes planned for two jobs
# waiting out a maintenance reservation); whether it would is time-to-result's question
# (sweep/held.py).
USABLE_NODE_STATES = ("idle", "mix", "plnd")


@dataclass(kw_only=True)
class ClusterStatus:
    name: str
    state: str  # idle | busy | unreachable | local
    idle_nodes: int
    total_nodes: int  # nodes of the partition, excluded ones not counted
    reason: str | None
    elapsed_s: float
    nodes: list[NodeRoom] = field(default_factory=list)


def probe(clusters: Sequence[ClusterConfig], timeout_s: float | None = None) -> list[ClusterStatus]:
    """Probes every cluster in parallel; one status per cluster, in the given order.

    Never raises and never waits much longer than the largest timeout: a cluster that does not
    answer in time is `unreachable`.
    """
    timeouts = [timeout_s if timeout_s is not None else c.probe_timeout_s for c in clusters]
    results: dict[int, ClusterStatus] = {}

    def work(i: int, cluster: ClusterConfig, timeout: float) -> None:
        results[i] = _probe_safe(cluster, timeout)

    # Daemon threads: even a probe stuck past every timeout cannot keep the process alive.
    threads = [
        threading.Thread(target=work, args=(i, c, t), daemon=True)
        for i, (c, t) in enumerate(zip(clusters, timeouts, strict=True))
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    deadline = start + max(timeouts, default=0) + 10  # run() kills at its timeout; slack for that
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [
        results.get(i)
        or ClusterStatus(
            name=c.name,
            state="unreachable",
            idle_nodes=0,
            total_nodes=0,
            reason="probe did not finish",
            elapsed_s=round(time.monotonic() - start, 2),
        )
        for i, c in enumerate(clusters)
    ]


def _probe_safe(cluster: ClusterConfig, timeout: float) -> ClusterStatus:
    start = time.monotonic()
    try:
        status = _probe_one(cluster, timeout)
    except Exception as e:  # noqa: BLE001  a probe reports, it never takes the table down
        status = _unreachable(cluster, f"probe failed: {type(e).__name__}: {e}")
    status.elapsed_s = round(time.monotonic() - start, 2)
    return status


def _unreachable(cluster: ClusterConfig, reason: str) -> ClusterStatus:
    return ClusterStatus(
        name=cluster.name, state="unreachable", idle_nodes=0, total_nodes=0, reason=reason,
        elapsed_s=0.0,
    )  # fmt: skip


def _probe_one(cluster: ClusterConfig, timeout: float) -> ClusterStatus:
    if cluster.simulated is not None:  # its queue lives in a launcher; it probes it there
        return _unreachable(cluster, "simulated: it exists only inside a sweep's launcher")
    if not cluster.slurm:
        return ClusterStatus(
            name=cluster.name, state="local", idle_nodes=1, total_nodes=1, reason=None,
            elapsed_s=0.0,
        )  # fmt: skip
    fields = "NodeList:|,StateCompact:|,CPUsState:|,Gres:|,GresUsed:|"
    argv = ["sinfo", "--noheader", "--Node", f"--Format={fields}"]
    if cluster.partition:
        argv.append(f"--partition={cluster.partition}")
    try:
        proc = remote.run(
            argv,
            login=cluster.login,
            ssh_options=cluster.ssh_options,
            timeout=timeout,
            env=cluster.env or None,  # e.g. SLURM_CONF for a second cluster
        )
    except remote.RemoteError as e:
        return _unreachable(cluster, e.reason)

    # One line per node and partition; with --partition each node appears once.
    nodes: dict[str, NodeRoom] = {}
    for line in proc.stdout.splitlines():
        node = parse_sinfo_node(line)
        if node and node.name not in cluster.exclude:
            nodes[node.name] = node
    idle = sum(n.state == "idle" for n in nodes.values())
    total = len(nodes)
    if total == 0:
        where = f"partition {cluster.partition!r}" if cluster.partition else "the cluster"
        return ClusterStatus(
            name=cluster.name, state="busy", idle_nodes=0, total_nodes=0,
            reason=f"no usable nodes in {where}", elapsed_s=0.0,
        )  # fmt: skip
    return ClusterStatus(
        name=cluster.name,
        state="idle" if idle else "busy",
        idle_nodes=idle,
        total_nodes=total,
        reason=None if idle else f"0/{total} nodes idle",
        elapsed_s=0.0,
        nodes=list(nodes.values()),
    )


def parse_sinfo_node(line: str) -> NodeRoom | None:
    """One `sinfo -N -O NodeList:|,StateCompact:|,CPUsState:|,Gres:|,GresUsed:|` line."""
    parts = [p.strip() for p in line.strip().split("|")]
    if len(parts) < 5 or not parts[0]:
        return None
    name, state, cpus, gres, gres_used = parts[:5]
    try:
        free_cpus = int(cpus.split("/")[1])  # allocated/idle/other/total
    except (IndexError, ValueError):
        free_cpus = 0
    usable = state in USABLE_NODE_STATES
    free_gpus = max(0, count_gpus(gres) - count_gpus(gres_used))
    return NodeRoom(
        name=name,
        state=state,
        free_cpus=free_cpus if usable else 0,
        free_gpus=free_gpus if usable else 0,
    )


def count_gpus(gres: str) -> int:
    """GPUs in a GRES string: `gpu:4`, `gpu:a100:8(S:0-1)`, `gpu:h100:2(IDX:0-1),shard:0`."""
    total = 0
    for item in gres.split(","):
        item = item.split("(")[0]
        if not item.startswith("gpu:"):
            continue
        count = item.rsplit(":", 1)[-1]
        total += int(count) if count.isdigit() else 0
    return total


# --- selection -----------------------------------------------------------------------------


def select_cluster(
    statuses: Iterable[ClusterStatus],
    clusters: Mapping[str, ClusterConfig] | Iterable[ClusterConfig],
    nodes: int = 1,
) -> str | None:
    """The most preferred cluster that can start a `nodes`-node job now, or None."""
    if not isinstance(clusters, Mapping):
        clusters = {c.name: c for c in clusters}
    known = [s for s in statuses if s.name in clusters]
    for s in sorted(known, key=lambda s: clusters[s.name].priority):
        available = s.state in ("idle", "local")
        if available and s.idle_nodes >= nodes and nodes <= clusters[s.name].max_nodes:
            return s.name
    return None
