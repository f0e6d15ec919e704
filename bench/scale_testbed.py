"""bench/scale.py's clusters on the real testbed, and a simulator shaped like it (calibration).

`--where testbed`: the testbed's alpha (Slurm here) and beta (over ssh), two 8-CPU nodes each
in `batch`: one-CPU jobs packed eight to a node, as one-GPU jobs are to a GPU node.
`--where testbed-sim`: two simulated clusters of the same shape, with the job durations the
testbed shows (a 1 s sleep plus submitit's start), so the same sweep can be run on both and the
controller's work compared: polls, submissions and state changes per job.
"""

import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import slurm_testbed  # noqa: E402 - tests/ holds the testbed module

JOB_ARGS = ["sleep_s=1"]  # one-second jobs; one task, one CPU each (the clusters have no GPUs)


class Testbed:
    def __init__(self):
        self.was_running = slurm_testbed.is_running()
        self.testbed = None

    def enter(self, conf: Path, tmp: Path) -> list[str]:
        self.testbed = slurm_testbed.start()
        shutil.copytree(self.testbed.conf_dir, conf)
        return ["alpha", "beta"]

    def exit(self) -> None:
        if self.testbed is not None and not self.was_running:
            self.testbed.stop()


class TestbedShapedSimulator:
    """Two clusters like the testbed's `batch` partitions, simulated (calibration)."""

    def __init__(self, duration_s: float = 2.5):
        self.duration_s = duration_s  # the testbed's 1 s jobs take this long in Slurm

    def enter(self, conf: Path, tmp: Path) -> list[str]:
        (conf / "cluster").mkdir(parents=True)
        for name, priority in (("alpha", 10), ("beta", 20)):
            spec = {"nodes": 2, "gpus_per_node": 0, "cpus_per_node": 8,
                    "duration_s": self.duration_s, "duration_sigma": 0.2,
                    "visibility_lag_s": 1.0, "seed": priority}  # fmt: skip
            cluster = {"name": name, "provider": "simulated", "priority": priority,
                       "max_nodes": 2, "data_root": str(tmp), "output_root": str(tmp),
                       "simulated": spec}  # fmt: skip
            (conf / "cluster" / f"{name}.yaml").write_text(yaml.safe_dump(cluster))
        return ["alpha", "beta"]

    def exit(self) -> None:
        pass
