"""Hydra launcher `multicluster`: thin plugin; the logic lives in `lingua_sweep.launcher`.

python train.py -m optim.lr=1e-3,3e-3 hydra/launcher=multicluster
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


@dataclass
class MulticlusterLauncherConf:
    _target_: str = "hydra_plugins.lingua_sweep_launcher.multicluster_launcher.MulticlusterLauncher"
    # Clusters to use, any order (priority comes from each cluster's config); null = all.
    clusters: list[str] | None = None
    cluster: str | None = None  # force every job onto this cluster
    probe_timeout_s: float | None = None  # null = each cluster's probe_timeout_s
    dry_run: bool = False  # print the plan, submit nothing
    when_busy: str = "queue"  # no idle room: queue on the first reachable cluster | fail
    nodes: int = 1
    gpus_per_node: int | None = None  # null = the cluster's
    tasks_per_node: int | None = None  # null = one per GPU
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    timeout_min: int = 240
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint + requeue
    max_num_timeout: int = 3  # requeues after preemption or time-out
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # extra shell lines before each job
    local_parallel: int = 2  # jobs at once on the `local` cluster
    poll_interval_s: float = 5.0
    remote_timeout_s: float = 120.0  # per ssh/rsync call to a login node


ConfigStore.instance().store(
    group="hydra/launcher",
    name="multicluster",
    node=MulticlusterLauncherConf,
    provider="lingua_sweep",
)


class MulticlusterLauncher(Launcher):
    def __init__(self, **params: Any) -> None:
        self.params = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in params.items()
        }
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from lingua_sweep.launcher import LauncherParams, launch

        return launch(self, LauncherParams(**self.params), job_overrides, initial_job_idx)
