"""A Hydra app that is not the trainer, for the launcher's tests (and the README's example).

    python tests/apps/rank_app.py -m value=1,2 hydra/launcher=multicluster

Returns `value * 100 + world size` from rank 0; raises on rank `fail_rank` (-1: none), after
the other ranks have started, like a real multi-GPU job whose one process dies.
"""

import os
import time
from dataclasses import dataclass

import hydra
from hydra.core.config_store import ConfigStore


@dataclass
class RankAppConfig:
    value: float = 1.0
    fail_rank: int = -1
    sleep_s: float = 0.0


ConfigStore.instance().store(name="rank_app", node=RankAppConfig)


@hydra.main(config_path=None, config_name="rank_app", version_base="1.3")
def main(cfg: RankAppConfig) -> float:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    time.sleep(cfg.sleep_s)
    if rank == cfg.fail_rank:
        raise ValueError(f"boom on rank {rank} of {world} ({os.environ.get('LINGUA_CLUSTER')})")
    return cfg.value * 100 + world


if __name__ == "__main__":
    main()
