"""Hydra launcher `multicluster`: thin plugin; the logic lives in `lingua_sweep.sweep`.

python train.py -m optim.lr=1e-3,3e-3 hydra/launcher=multicluster
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from lingua_sweep.sweep.params import LauncherParams


@dataclass(kw_only=True)
class MulticlusterLauncherConf(LauncherParams):
    _target_: str = "hydra_plugins.lingua_sweep_launcher.multicluster_launcher.MulticlusterLauncher"


ConfigStore.instance().store(
    group="hydra/launcher",
    name="multicluster",
    node=MulticlusterLauncherConf,
    provider="lingua_sweep",
)


class MulticlusterLauncher(Launcher):
    # Every job is composed and validated before any is submitted (sweepers may skip their own
    # pass: hydra/sweeper=grid does).
    validates_every_job = True

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
        from lingua_sweep.sweep.launch import launch

        return launch(self, LauncherParams(**self.params), job_overrides, initial_job_idx)
