"""Hydra sweeper `grid`: Hydra's basic sweeper without its second composition of every job.

python train.py -m 'optim.lr=range(1,100)' 'model.dim=256,512' hydra/sweeper=grid \
    hydra/launcher=multicluster

Hydra's basic sweeper composes each job once to validate it (~0.1-0.3 s a job: 17 minutes
before a 10,000-job grid starts) and the launcher composes it again. The multicluster launcher
composes and validates every job before it submits any, reusing one composition per distinct
shape of overrides, so with it this sweeper skips its own pass; with any other launcher it
validates as the basic sweeper does. Same grammar, same job order, same `max_batch_size`.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore


@dataclass
class GridSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.lingua_sweep_launcher.grid_sweeper.GridSweeper"


ConfigStore.instance().store(
    group="hydra/sweeper", name="grid", node=GridSweeperConf, provider="lingua_sweep"
)


class GridSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        if getattr(self.launcher, "validates_every_job", False):
            return  # the launcher composes and checks each job before submitting any
        super().validate_batch_is_legal(batch)
