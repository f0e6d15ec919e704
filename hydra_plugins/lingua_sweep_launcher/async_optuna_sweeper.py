"""Hydra sweeper `async_optuna`: thin plugin; the logic lives in `lingua_sweep.sweep.async_optuna`.

python train.py -m hydra/sweeper=async_optuna hydra/launcher=multicluster \
    'optim.lr=tag(log, interval(1e-4, 1e-2))' hydra/sweeper/pruner=median

The config surface is hydra-optuna-sweeper's (its samplers in `hydra/sweeper/sampler` are
shared), plus `pruner` (group `hydra/sweeper/pruner`, or any `_target_`; null = no pruning).
Import-light on purpose: Hydra imports every plugin module at startup.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig

from hydra_plugins.hydra_optuna_sweeper.config import Direction


@dataclass(kw_only=True)
class AsyncOptunaSweeperConf:
    _target_: str = "hydra_plugins.lingua_sweep_launcher.async_optuna_sweeper.AsyncOptunaSweeper"
    # _self_ first: a pruner picked in hydra/sweeper/pruner replaces the null below.
    defaults: list[Any] = field(
        default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": None}]
    )
    sampler: Any = MISSING  # hydra/sweeper/sampler: tpe, random, grid, cmaes, ...
    direction: Any = Direction.minimize  # or a list of directions (multi-objective, no pruning)
    storage: Any = None  # null: sqlite:///<sweep dir>/optuna.db, so a rerun continues the study
    study_name: str | None = None  # null: the experiment's name
    n_trials: int = 20  # in the whole study, trials of earlier runs of this sweep included
    n_jobs: int = 2  # trials in flight at once; the next one starts as soon as one ends
    # Stop asking for trials once more than this fraction of the finished ones (counted over at
    # least n_jobs) failed. Diverging at the top of an LR range is an expected outcome, so the
    # default tolerates it; a broken environment, where most trials fail, stops the sweep.
    max_failure_rate: float = 0.5
    search_space: dict[str, Any] | None = None  # deprecated by hydra-optuna-sweeper; use params
    params: dict[str, str] | None = None  # `key: override grammar`, e.g. tag(log, interval(...))
    custom_search_space: str | None = None  # dotpath of fn(config, trial), as in hydra-optuna
    pruner: Any = None  # optuna.pruners.* via _target_; reads each trial's loss/val by step


@dataclass(kw_only=True)
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1


@dataclass(kw_only=True)
class PercentilePrunerConf:
    _target_: str = "optuna.pruners.PercentilePruner"
    percentile: float = 25.0
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1


@dataclass(kw_only=True)
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0


@dataclass(kw_only=True)
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass(kw_only=True)
class ThresholdPrunerConf:
    _target_: str = "optuna.pruners.ThresholdPruner"
    lower: float | None = None
    upper: float | None = None
    n_warmup_steps: int = 0
    interval_steps: int = 1


store = ConfigStore.instance()
store.store(group="hydra/sweeper", name="async_optuna", node=AsyncOptunaSweeperConf,
            provider="lingua_sweep")  # fmt: skip
for name, node in [
    ("median", MedianPrunerConf), ("percentile", PercentilePrunerConf),
    ("successive_halving", SuccessiveHalvingPrunerConf), ("hyperband", HyperbandPrunerConf),
    ("threshold", ThresholdPrunerConf),
]:  # fmt: skip
    store.store(group="hydra/sweeper/pruner", name=name, node=node, provider="lingua_sweep")


class AsyncOptunaSweeper(Sweeper):
    def __init__(self, **params: Any) -> None:
        from lingua_sweep.sweep.async_optuna import AsyncOptunaSweep

        self.sweeper = AsyncOptunaSweep(**params)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function,
                           config=config)  # fmt: skip

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
