import os

import pytest
import slurm_testbed as testbed_lib  # tests/ is on sys.path: pytest puts conftest's dir there


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def slurm_testbed():
    """The real two-cluster Slurm testbed (tests/slurm_testbed.py), started once per session.

    Skipped on a dev machine that cannot run it; under CI a missing dependency fails instead.
    LINGUA_TESTBED_DIR and LINGUA_TESTBED_PORT_BASE point the session at a testbed of its own,
    beside the default one (/tmp/lingua_sweep_testbed, ports 27140+).
    """
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root")
    missing = testbed_lib.missing_dependencies()
    if missing:
        problems.append(f"missing {', '.join(missing)} (run tests/install_system_deps.sh)")
    if problems:
        reason = "Slurm testbed unavailable: " + "; ".join(problems)
        if _in_ci():
            pytest.fail(reason + " [CI is set, so this fails instead of skipping]")
        pytest.skip(reason)

    was_running = testbed_lib.is_running()
    testbed = testbed_lib.start()
    yield testbed
    if not was_running:
        testbed_lib.stop()
