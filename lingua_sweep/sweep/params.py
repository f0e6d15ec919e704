"""The multicluster launcher's knobs (`hydra.launcher.*`): the one definition.

The Hydra plugin stores a subclass of this dataclass (adding `_target_`) in the ConfigStore, so
a typo in `hydra.launcher.x=...` fails at compose time. Import-light on purpose: Hydra imports
every plugin module at startup.
"""

from dataclasses import dataclass, field
from typing import Any

WHEN_BUSY = ("queue", "wait", "fail")
PLACEMENTS = ("time_to_result", "priority")


@dataclass(kw_only=True)
class LauncherParams:
    # Clusters to use, any order (priority comes from each cluster's config); null = all.
    clusters: list[str] | None = None
    cluster: str | None = None  # force every job onto this cluster
    probe_timeout_s: float | None = None  # null = each cluster's probe_timeout_s
    probe_every_s: float = 30.0  # re-probe for room while jobs wait
    dry_run: bool = False  # print the plan, submit nothing
    # No cluster has room for a job now: queue it in the Slurm queue of the first reachable
    # cluster (queue), keep it here until one has room (wait), or stop the sweep (fail).
    when_busy: str = "queue"
    # time_to_result: each job where its predicted finish (start + run time) is earliest, the
    # clusters' priority breaking ties; pending jobs move when elsewhere is clearly sooner.
    # priority: the first cluster in priority order with room (jobs move after max_pending_s).
    placement: str = "time_to_result"
    # Seconds a job of an app that is not the trainer runs on an H100 node, for placement before
    # the sweep has seen its own jobs run; null = unknown until then (the trainer's jobs are
    # sized from their config).
    expected_run_s: float | None = None
    # A job pending longer than this in one cluster's queue while another has room moves there
    # (once); null = never. With time_to_result, a safety net.
    max_pending_s: float | None = 600.0
    detach: bool = False  # submit, print the sweep dir, return; `lingua-sweep status/resume`
    # A sweep dir that already has a journal: reattach to that sweep (true), or start afresh,
    # its journal kept aside as journal.<time>.jsonl (false).
    resume: bool = True
    nodes: int = 1
    gpus_per_node: int | None = None  # null = the cluster's
    tasks_per_node: int | None = None  # null = one per GPU (one on a CPU partition)
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    timeout_min: int = 240
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint + requeue
    max_num_timeout: int = 3  # requeues after preemption or time-out
    # A job preempted and not requeued, or lost with its node (PREEMPTED, NODE_FAIL, BOOT_FAIL,
    # held after a failed launch) is submitted again, in its own dir (so it resumes from its
    # checkpoint) on its own cluster, up to this many times; then it is FAILED.
    max_resubmits: int = 3
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # extra shell lines before each job
    local_parallel: int = 2  # jobs at once on the `local` cluster
    poll_interval_s: float = 5.0
    remote_timeout_s: float = 120.0  # per ssh/rsync call to a login node
    live: bool | None = None  # live table: null = when stderr is a terminal
