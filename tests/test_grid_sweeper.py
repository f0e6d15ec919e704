"""hydra/sweeper=grid: Hydra's basic sweeper, without its own composition of every job when the
launcher composes and validates them (multicluster); as strict as the basic one otherwise."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "apps" / "rank_app.py"


def run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(APP), "-m", *args, f"hydra.sweep.dir={tmp_path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_with_hydras_own_launcher_every_job_is_still_validated_first(tmp_path):
    bad = run(tmp_path, "value=1,oops", "hydra/sweeper=grid")
    assert bad.returncode == 1 and "oops" in bad.stderr
    assert not (tmp_path / "0").exists()  # job #0 did not run before #1 was found wrong
    good = run(tmp_path, "value=1,2", "hydra/sweeper=grid")
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "1" / ".hydra" / "overrides.yaml").read_text() == "- value=2\n"


def test_the_multicluster_launcher_validates_for_it(tmp_path, monkeypatch):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from hydra_plugins.lingua_sweep_launcher.grid_sweeper import GridSweeper
    from hydra_plugins.lingua_sweep_launcher.multicluster_launcher import MulticlusterLauncher

    calls = []
    monkeypatch.setattr(BasicSweeper, "validate_batch_is_legal", lambda self, b: calls.append(b))
    sweeper = GridSweeper(max_batch_size=None)
    sweeper.launcher = MulticlusterLauncher()
    sweeper.validate_batch_is_legal([["value=1"]])
    assert calls == []
    sweeper.launcher = object()  # any other launcher
    sweeper.validate_batch_is_legal([["value=1"]])
    assert calls == [[["value=1"]]]
