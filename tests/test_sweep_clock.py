"""The controller's clock: virtual time waits for the calls in flight and jumps over the main
loop's sleeps, so a sweep on simulated clusters takes a simulated hour in seconds and repeats
itself run after run."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError
from lingua_sweep.sweep import clock
from lingua_sweep.sweep.journal import Journal
from lingua_sweep.sweep.sim_backend import choose_clock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def wall_clock_after():
    yield
    clock.use(clock.WallClock())


def test_on_virtual_time_calls_take_no_time_and_sleeps_jump(wall_clock_after):
    clock.use(clock.VirtualClock(start=1000.0))
    assert clock.virtual() and clock.now() == clock.monotonic() == 1000.0
    seen = []

    def a_call(tag):
        time.sleep(0.05)
        seen.append((tag, clock.now(), threading.current_thread() is threading.main_thread()))

    clock.start_thread(a_call, "estimate", name="estimate")
    assert seen == [("estimate", 1000.0, True)]  # done, on this thread, at no time
    clock.sleep(5.0)
    assert clock.now() == 1005.0
    # A cluster's calls too: in order, done before the loop collects them
    from types import SimpleNamespace

    from lingua_sweep.sweep.link import Link

    link = Link(config=SimpleNamespace(name="sim"), backend=None)
    got = []
    link.start(lambda: a_call("poll") or 1, got.append, kind="poll")
    link.start(lambda: a_call("submit") or 2, got.append, kind="submit")
    assert [tag for tag, *_ in seen[1:]] == ["poll", "submit"] and not link.busy
    link.collect()
    assert got == [1, 2]


def test_a_sweep_has_one_clock(wall_clock_after):
    def cluster(name, **simulated):
        return ClusterConfig(name=name, simulated=simulated or None)

    with pytest.raises(UserError, match=r"\['b'\] on the wall clock.*simulated.clock=virtual"):
        choose_clock([cluster("a", clock="virtual"), cluster("b", nodes=2)])
    with pytest.raises(UserError, match=r"\['real'\] on the wall clock"):
        choose_clock([cluster("a", clock="virtual"), cluster("real")])
    with pytest.raises(UserError, match="simulated.clock='fast': choose one of"):
        choose_clock([cluster("a", clock="fast")])
    choose_clock([cluster("a", nodes=2), cluster("real")])
    assert not clock.virtual()
    choose_clock([cluster("a", clock="virtual"), cluster("b", clock="virtual")])
    assert clock.virtual()


def virtual_sweep(tmp_path: Path) -> list[tuple]:
    """Six jobs of ~10 simulated minutes on two simulated clusters of one node each (the
    preferred one twice as slow), on virtual time, with the launcher's own intervals; what
    became of each job, in simulated seconds from the first."""
    conf = tmp_path / "conf" / "cluster"
    conf.mkdir(parents=True)
    for name, priority, flops, duration in (("slow", 1, 70e12, 1200.0),
                                            ("fast", 2, 140e12, 600.0)):  # fmt: skip
        spec = {"nodes": 1, "gpus_per_node": 8, "duration_s": duration, "duration_sigma": 0.1,
                "background_load": 0.5, "clock": "virtual", "seed": priority}  # fmt: skip
        cluster = {"name": name, "gpus_per_node": 8, "priority": priority, "simulated": spec,
                   "model_flops_per_s": flops, "data_root": str(tmp_path),
                   "output_root": str(tmp_path)}  # fmt: skip
        (conf / f"{name}.yaml").write_text(yaml.safe_dump(cluster))
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_"))}
    env["PYTHONHASHSEED"] = "0"
    began = time.monotonic()
    out = subprocess.run([
        sys.executable, str(REPO / "tests" / "apps" / "rank_app.py"), "-m",
        "value=range(0,6)", "hydra/launcher=multicluster", "hydra.launcher.expected_run_s=600",
        "hydra.launcher.live=false", "hydra.launcher.clusters=[slow,fast]",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.sweep.dir={sweep}",
    ], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    state = Journal(sweep).replay()
    t0 = min(j.submitted_at for j in state.jobs.values() if j.submitted_at)
    jobs = sorted(state.jobs.values(), key=lambda j: j.index)
    assert all(j.state == "COMPLETED" for j in jobs)
    span = max(j.ended_at for j in jobs) - t0
    assert span > 1800 and time.monotonic() - began < span / 20  # an hour in seconds
    return [(j.index, j.cluster, j.moves, round(j.started_at - t0, 3),
             round(j.ended_at - t0, 3)) for j in jobs]  # fmt: skip


def test_a_simulated_sweep_on_virtual_time_repeats_itself(tmp_path):
    first = virtual_sweep(tmp_path / "1")
    assert first == virtual_sweep(tmp_path / "2")
    assert {cluster for _, cluster, *_ in first} == {"slow", "fast"}
