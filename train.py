"""Train one model, or sweep many with `-m`: `python train.py experiment=debug`.

The cluster is detected here, at the edge, and lands in the config as the `cluster` group;
everything below reads it from the config.
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lingua_sweep.clusters import detect_cluster, load_clusters
from lingua_sweep.config import check_known_keys, register_configs
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
        check_known_keys(cfg)
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


def config_dirs(argv: list[str]) -> list[str]:
    """`--config-dir DIR` / `-cd DIR`: your cluster definitions there are known to detection too."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(argv[i + 1])
        elif arg.startswith("--config-dir="):
            dirs.append(arg.split("=", 1)[1])
    return [d for d in dirs if (Path(d) / "cluster").is_dir()]


def with_detected_cluster(argv: list[str]) -> list[str]:
    """Adds `cluster=<detected>` unless the user chose one."""
    if any(arg.startswith(("cluster=", "+cluster=")) for arg in argv[1:]):
        return argv
    if any(arg in ("--help", "-h", "--hydra-help") for arg in argv[1:]):
        return argv
    # Beside the other overrides: argparse rejects positionals split around options (`-m`);
    # with none, first: after an option it would be read as that option's value (`--info`).
    detected = f"cluster={detect_cluster(load_clusters(config_dirs(argv)))}"
    first = next((i for i, a in enumerate(argv) if i and "=" in a and not a.startswith("-")), 1)
    return [*argv[:first], detected, *argv[first:]]


def report_config_errors_on_one_line() -> None:
    """Hydra prints a composition error over several lines with a `+key` hint that our schema
    makes wrong; users get one line naming the key and where the keys are listed (exit 2). The
    sweep launcher's own mistakes arrive here the same way; failed jobs exit 1."""
    import hydra._internal.utils as hydra_utils
    from hydra.errors import CompactHydraException

    from lingua_sweep.sweep.launch import SweepFailed

    original = hydra_utils.run_and_report

    def run_and_report(func):
        def one_line_errors():
            try:
                return func()
            except SweepFailed as e:  # jobs failed: the table is printed, this is its last line
                print(str(e), file=sys.stderr)
                sys.exit(1)
            except OSError as e:  # Hydra creating the run dir: the path and the OS's reason
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                where = f" {e.filename}" if e.filename else ""
                reason = (e.strerror or str(e)).lower()
                print(f"error: cannot write{where}: {reason}; choose another hydra.run.dir "
                      "(or hydra.sweep.dir)", file=sys.stderr)  # fmt: skip
                sys.exit(2)
            except CompactHydraException as e:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                texts = [str(e), str(e.__cause__ or "")]
                words = [t.strip().splitlines()[0] for t in texts if t.strip()]
                listed = "not in" in words[-1]  # an unknown key: say where the keys are
                hint = "; `python train.py --cfg job` lists every key" if listed else ""
                print("error: " + " ".join(words) + hint, file=sys.stderr)
                sys.exit(2)

        return original(one_line_errors)

    hydra_utils.run_and_report = run_and_report


if __name__ == "__main__":
    report_config_errors_on_one_line()
    try:
        sys.argv = with_detected_cluster(sys.argv)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: one run dir for all ranks
            from lingua_sweep.distributed import torchrun_argv

            sys.argv = torchrun_argv(sys.argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
