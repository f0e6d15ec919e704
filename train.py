"""Train one model, or sweep many with `-m`: `python train.py experiment=debug`.

The cluster is detected here, at the edge, and lands in the config as the `cluster` group;
everything below reads it from the config.
"""

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lingua_sweep.clusters import detect_cluster, load_clusters
from lingua_sweep.config import register_configs
from lingua_sweep.errors import UserError

register_configs()
log = logging.getLogger("train")

EX_TEMPFAIL = 75  # preempted: checkpoint written, the run should be retried


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from lingua_sweep.distributed import publish_run_dir
    from lingua_sweep.train import Preempted, run

    single_run = HydraConfig.get().mode == RunMode.RUN
    if single_run:
        publish_run_dir(HydraConfig.get().runtime.output_dir)  # torchrun: the others wait for it
    try:
        return run(cfg)
    except UserError as e:
        if not single_run:
            raise  # a sweep's launcher reports it per job
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        if not single_run:
            raise
        log.warning(str(e))
        sys.exit(EX_TEMPFAIL)


def with_detected_cluster(argv: list[str]) -> list[str]:
    """Adds `cluster=<detected>` unless the user chose one."""
    if any(arg.startswith(("cluster=", "+cluster=")) for arg in argv[1:]):
        return argv
    if any(arg in ("--help", "-h", "--hydra-help") for arg in argv[1:]):
        return argv
    # Beside the other overrides: argparse rejects positionals split around options (`-m`).
    detected = f"cluster={detect_cluster(load_clusters())}"
    first = next((i for i, a in enumerate(argv) if i and "=" in a and not a.startswith("-")), None)
    if first is None:
        return [*argv, detected]
    return [*argv[:first], detected, *argv[first:]]


if __name__ == "__main__":
    try:
        sys.argv = with_detected_cluster(sys.argv)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: one run dir for all ranks
            from lingua_sweep.distributed import torchrun_argv

            sys.argv = torchrun_argv(sys.argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
