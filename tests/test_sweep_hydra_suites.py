"""Hydra's own launcher test suites against `multicluster`: it is a launcher for any Hydra app.

Parametrized the way hydra-submitit-launcher runs them: on the `local` cluster (no Slurm), and on
the testbed's local Slurm cluster `alpha`.
"""

import copy
import os
from pathlib import Path

import pytest
from hydra.core.singleton import Singleton
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)
from hydra.version import VersionBase


@pytest.fixture(autouse=True)
def fresh_hydra_version_base():
    """Hydra's suites assume a fresh process: earlier tests in this session may have set
    Hydra's global version base (initialize_config_dir(version_base="1.3")), which changes
    defaults such as `hydra.job.chdir`."""
    saved = copy.deepcopy(Singleton.get_state())
    Singleton._instances.pop(VersionBase, None)
    yield
    Singleton.set_state(saved)


TESTBED_CONF = Path(os.environ.get("LINGUA_TESTBED_DIR", "/tmp/lingua_sweep_testbed")) / "conf"
FAST = ["hydra.launcher.poll_interval_s=0.1", "hydra.launcher.live=false"]
LOCAL = ["hydra.launcher.clusters=[local]", *FAST]
ALPHA = ["hydra.launcher.clusters=[alpha]", f"hydra.searchpath=[file://{TESTBED_CONF}]", *FAST]


@pytest.mark.parametrize("launcher_name, overrides", [("multicluster", LOCAL)])
class TestMulticlusterOnLocal(LauncherTestSuite):
    pass


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_testbed")
@pytest.mark.parametrize("launcher_name, overrides", [("multicluster", ALPHA)])
class TestMulticlusterOnSlurm(LauncherTestSuite):
    pass


@pytest.mark.parametrize(
    "launcher_name, overrides",
    [("multicluster", [*LOCAL, "hydra/sweeper=basic", "hydra.sweeper.max_batch_size=2"])],
)
class TestMulticlusterBatchedOnLocal(BatchedSweeperTestSuite):
    pass


def _flags(overrides: list[str]) -> list[str]:
    # The suite reruns a finished sweep in the same sweep dir with other code and expects it to
    # run again; multicluster reattaches to a sweep dir's journal unless told to start afresh.
    return ["-m", "hydra/launcher=multicluster", "hydra/hydra_logging=disabled",
            "hydra/job_logging=disabled", "hydra.launcher.resume=false", *overrides]  # fmt: skip


@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags", [pytest.param({}, _flags(LOCAL), id="local")]
)
class TestMulticlusterIntegrationOnLocal(IntegrationTestSuite):
    pass


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_testbed")
@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags", [pytest.param({}, _flags(ALPHA), id="alpha")]
)
class TestMulticlusterIntegrationOnSlurm(IntegrationTestSuite):
    pass
