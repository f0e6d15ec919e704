import os

import pytest

# Under pytest-xdist (`-n 2`) every worker but the first gets a testbed of its own (own state
# dir, own ports), so two workers never share a cluster's nodes. Set before the import below,
# which reads them.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
if _WORKER != "gw0" and "LINGUA_TESTBED_DIR" not in os.environ:
    _n = int(_WORKER.removeprefix("gw"))
    os.environ["LINGUA_TESTBED_DIR"] = f"/tmp/lingua_sweep_testbed_{_WORKER}"
    os.environ["LINGUA_TESTBED_PORT_BASE"] = str(27140 + 1000 * _n)

import slurm_testbed as testbed_lib  # noqa: E402 - tests/ is on sys.path (conftest's dir)

SLURM_UNAVAILABLE = "Slurm testbed unavailable"
_slurm_skips: dict[str, int] = {}  # reason -> number of tests skipped for it


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        if reason.startswith(SLURM_UNAVAILABLE):
            _slurm_skips[reason] = _slurm_skips.get(reason, 0) + 1


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """Skipped Slurm tests are the last line of the run, after pytest's own totals: `-ra`'s
    one SKIPPED line among many was missed (scripts/test.sh as non-root skipped them all)."""
    result = yield
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for reason, count in _slurm_skips.items():
        line = f"SKIPPED {count} Slurm testbed tests ({reason}); CI=true makes this a failure"
        if reporter is not None:
            reporter.write_line(line, yellow=True, bold=True)
        else:
            print(line)
    return result


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
        reason = f"{SLURM_UNAVAILABLE}: " + "; ".join(problems)
        if _in_ci():
            pytest.fail(reason + " [CI is set, so this fails instead of skipping]")
        pytest.skip(reason)

    was_running = testbed_lib.is_running()
    testbed = testbed_lib.start()
    yield testbed
    if not was_running:
        testbed_lib.stop()


@pytest.fixture(scope="session")
def testbed(slurm_testbed):
    """The testbed with the trainer's data on its clusters (the embedded corpus as user data)."""
    import yaml

    from lingua_sweep import corpus

    for name in ("alpha", "beta"):
        root = yaml.safe_load((slurm_testbed.cluster_conf_dir / f"{name}.yaml").read_text())
        corpus.install(root["data_root"])
    return slurm_testbed
