"""The simulated Slurm cluster: its scheduler, its answers in the agent's words, and the
controller's cost per job on it not growing with the sweep."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from lingua_sweep.sweep.journal import Journal
from lingua_sweep.sweep.simulator import SimCluster, SimSpec

REPO = Path(__file__).resolve().parents[1]


def tasks(tmp_path, n: int) -> list:
    template = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    config = [SimpleNamespace(template=template, num=i, task=[f"x={i}"]) for i in range(n)]
    return [SimpleNamespace(config=c) for c in config]


def one_gpu(**kw) -> dict:
    return {"nodes": 1, "gpus_per_node": 1, "ntasks_per_node": 1, **kw}


def wait_until(sim: SimCluster, ids: list[str], states: set[str], timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        reply = sim.poll({"jobs": [{"id": i} for i in ids], "files": {}, "prefix": "b"})
        if all(reply["states"][i]["state"] in states for i in ids):
            return reply
        assert time.monotonic() < deadline, reply["states"]
        time.sleep(0.05)


def test_jobs_start_first_fit_in_order_and_pending_ones_say_why(tmp_path):
    sim = SimCluster("sim", SimSpec(nodes=1, gpus_per_node=2, duration_s=0.3, duration_sigma=0))
    ids = sim.submit(tasks(tmp_path, 3), folder="f", params=one_gpu(), batch="b1")["ids"]
    assert ids == ["1000_0", "1000_1", "1000_2"]
    reply = sim.poll({"jobs": [{"id": i} for i in ids], "files": {}, "prefix": "b1"})
    assert [reply["states"][i]["state"] for i in ids] == ["RUNNING", "RUNNING", "PENDING"]
    assert reply["states"]["1000_2"]["reason"] == "Resources"
    assert set(reply["named"]) == set(ids)
    assert sim.probe().nodes[0].free_gpus == 0
    done = wait_until(sim, ids, {"COMPLETED"})
    assert done["outcomes"]["1000_2"]["status"] == "COMPLETED"
    assert isinstance(done["outcomes"]["1000_2"]["value"], float)
    # What the job itself writes in its dir on a real cluster.
    status = json.loads((tmp_path / "2" / "status.json").read_text())
    assert status["status"] == "COMPLETED" and status["job_id"] == "1000_2"
    assert (tmp_path / "2" / ".hydra" / "overrides.yaml").read_text() == "- x=2\n"
    assert (tmp_path / "2" / "metrics.jsonl").read_text().count("\n") == 5


def test_a_maintenance_reservation_holds_idle_nodes_as_slurm_does(tmp_path):
    """As on the testbed's real Slurm: before a reservation the node is idle to sinfo; a job
    whose time limit reaches into it pends (ReqNodeNotAvail) and Slurm starts it at the
    reservation's end; a job that ends before the reservation starts now."""
    sim = SimCluster("sim", SimSpec(nodes=2, gpus_per_node=8, reservations=[
        {"start_s": 3600.0, "duration_s": 7200.0, "nodes": 1}]))  # fmt: skip
    whole = {"nodes": 1, "gpus_per_node": 8, "ntasks_per_node": 1}
    assert [n.state for n in sim.probe().nodes] == ["idle", "idle"]
    assert sim.estimate({**whole, "time": 30}) == pytest.approx(time.time(), abs=2)
    long = sim.submit(tasks(tmp_path, 2), folder="f", params={**whole, "time": 240}, batch="b")
    reply = sim.poll({"jobs": [{"id": i} for i in long["ids"]], "files": {}, "prefix": "b"})
    first, second = (reply["states"][i] for i in long["ids"])
    assert first["state"] == "RUNNING"  # on the node outside the reservation
    assert second["state"] == "PENDING" and second["reason"].startswith("ReqNodeNotAvail")
    # At the reservation's end (10,800 s), before the other node frees (its limit: 14,400 s)
    assert second["start"] == pytest.approx(time.time() + 3600 + 7200, abs=5)
    assert sim.probe().idle_nodes == 1  # idle to sinfo, yet it runs nothing
    # --test-only plans the pending job as if the reservation did not hold it, and a short job
    # after it: 14,400 s (the testbed's Slurm told a 5-minute job 60 minutes so)...
    assert sim.estimate({**whole, "time": 30}) == pytest.approx(time.time() + 14400, abs=5)
    short = sim.submit(tasks(tmp_path, 1), folder="f", params={**whole, "time": 30}, batch="s")
    # ... yet the scheduler starts one at once, ahead of the held job (backfill), as Slurm did
    assert sim.poll({"jobs": [{"id": short["ids"][0]}], "files": {},
                     "prefix": "s"})["states"][short["ids"][0]]["state"] == "RUNNING"  # fmt: skip
    during = SimCluster("during", SimSpec(nodes=2, reservations=[
        {"start_s": 0.0, "duration_s": 600.0, "nodes": 1}]))  # fmt: skip
    assert [n.state for n in during.probe().nodes] == ["maint", "idle"]
    # scontrol show reservation: node 0 keeps a job of 4 hours out until the end; one of 30
    # minutes fits before it begins if it starts within 30 minutes
    assert sim.reserved_nodes({"time": 240}) == {
        "sim0": pytest.approx([time.time() - 10800, time.time() + 10800], abs=5)}  # fmt: skip
    assert sim.reserved_nodes({"time": 30}) == {
        "sim0": pytest.approx([time.time() + 1800, time.time() + 10800], abs=5)}  # fmt: skip


def test_preemption_failure_and_lag_answer_as_slurm_would(tmp_path):
    spec = SimSpec(nodes=4, gpus_per_node=1, duration_s=0.2, duration_sigma=0, preempt_rate=1.0,
                   visibility_lag_s=0.3)  # fmt: skip
    sim = SimCluster("sim", spec)
    [job] = sim.submit(tasks(tmp_path, 1), folder="f", params=one_gpu(), batch="b")["ids"]
    early = sim.poll({"jobs": [{"id": job}], "files": {}, "prefix": "b"})
    assert early["states"][job] == {"state": "UNKNOWN"} and early["named"] == {}
    reply = wait_until(sim, [job], {"PREEMPTED"})
    assert reply["outcomes"][job] == {"status": "RESUBMIT", "error": "preempted"}
    failing = SimCluster("sim", SimSpec(nodes=1, gpus_per_node=1, duration_s=0.1, fail_rate=1))
    [bad] = failing.submit(tasks(tmp_path, 1), folder="f", params=one_gpu(), batch="b")["ids"]
    assert wait_until(failing, [bad], {"FAILED"})["outcomes"][bad]["status"] == "FAILED"


def test_limits_refuse_as_sbatch_does_and_are_told_to_the_launcher(tmp_path):
    sim = SimCluster("sim", SimSpec(nodes=1, gpus_per_node=1, max_submit=2, max_array_size=3))
    assert sim.submit(tasks(tmp_path, 4), folder="f", params=one_gpu(), batch="b")["kind"] == (
        "too_big"
    )
    assert "ids" in sim.submit(tasks(tmp_path, 2), folder="f", params=one_gpu(), batch="b")
    refused = sim.submit(tasks(tmp_path, 1), folder="f", params=one_gpu(), batch="b")
    assert refused == {"refused": "QOSMaxSubmitJobPerUserLimit", "kind": "transient"}
    limits, usage = sim.limits()
    assert (limits.max_submit, limits.max_array, usage) == (2, 3, {})
    sim.cancel(["1000_0", "1000_1"])
    assert sim.active == set()


def write_clusters(conf: Path, root: Path) -> None:
    (conf / "cluster").mkdir(parents=True)
    for name, nodes, priority in (("sim-a", 16, 1), ("sim-b", 8, 2)):
        spec = {"nodes": nodes, "gpus_per_node": 8, "duration_s": 300.0, "speed": 1200.0,
                "preempt_rate": 0.01, "fail_rate": 0.01, "visibility_lag_s": 0.5,
                "background_load": 0.2, "seed": priority}  # fmt: skip
        cluster = {"name": name, "gpus_per_node": 8, "priority": priority, "simulated": spec,
                   "data_root": str(root), "output_root": str(root)}  # fmt: skip
        (conf / "cluster" / f"{name}.yaml").write_text(yaml.safe_dump(cluster))


def run_grid(tmp_path: Path, jobs: int, *extra: str, poll_s: float = 0.5) -> tuple[Path, dict]:
    conf, sweep, profile = tmp_path / "conf", tmp_path / f"sweep{jobs}", tmp_path / f"p{jobs}"
    if not conf.exists():
        write_clusters(conf, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_"))}
    cmd = [
        sys.executable, str(REPO / "tests" / "apps" / "rank_app.py"), "-m",
        f"value=range(0,{jobs})", "hydra/sweeper=grid", "hydra/launcher=multicluster",
        "hydra.launcher.clusters=[sim-a,sim-b]", "hydra.launcher.gpus_per_node=1",
        f"hydra.launcher.poll_interval_s={poll_s}", "hydra.launcher.live=false",
        f"hydra.searchpath=[file://{conf}]", f"hydra.sweep.dir={sweep}", *extra,
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**env, "LINGUA_SWEEP_PROFILE": str(profile)})  # fmt: skip
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1: some jobs failed, as drawn
    return sweep, json.loads(profile.read_text())


def test_preempted_jobs_go_back_together_in_one_array_per_cluster(tmp_path):
    """A thousand preemptions must not cost a thousand cycles: jobs bound for a cluster are
    submitted again as one array."""
    conf = tmp_path / "conf"
    write_clusters(conf, tmp_path)
    for name in ("sim-a", "sim-b"):
        path = conf / "cluster" / f"{name}.yaml"
        cluster = yaml.safe_load(path.read_text())
        cluster["simulated"].update(preempt_rate=1.0, fail_rate=0.0, background_load=0.0)
        path.write_text(yaml.safe_dump(cluster))
    sweep, _ = run_grid(tmp_path, 60, "hydra.launcher.max_resubmits=1")
    records = [json.loads(line) for line in (sweep / "journal.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "resubmit" for r in records) == 60  # each preempted, sent again
    results = [r for r in records if r["kind"] == "result"]
    assert len(results) == 60 and all(r["status"] == "FAILED" for r in results)
    assert "after 1 resubmissions" in results[0]["error"]
    # 60 first submissions and 60 resubmissions, in arrays: a handful of sbatch calls.
    assert sum(r["kind"] == "intent" for r in records) <= 12


def sweep_cost(tmp_path: Path, jobs: int) -> float:
    """The launcher's CPU seconds per job for a `jobs`-job grid on two simulated clusters,
    from the controller's start (Python's start-up left out), the simulator's own taken out.

    Polled every 0.1 s, not 0.5: the measure is CPU, not wall time, and the loop's sleep was
    most of the 5,000-job sweep's wall time (its cycles, each over every job in flight, come
    more often: no less of a test of the cost per job)."""
    sweep, report = run_grid(tmp_path, jobs, poll_s=0.1)
    state = Journal(sweep).replay()
    assert len(state.jobs) == jobs and all(j.final for j in state.jobs.values())
    assert sum(j.resubmits for j in state.jobs.values()) > 0  # preempted ones ran again
    sim_cpu = sum(s["cpu_s"] for s in report["simulated"].values())
    return (report["launch_cpu_s"] - sim_cpu) / jobs


def test_cost_per_job_does_not_grow_with_the_sweep(tmp_path):
    small, large = sweep_cost(tmp_path, 500), sweep_cost(tmp_path, 5000)
    print(f"launcher CPU per job: {small * 1000:.2f} ms at 500 jobs, {large * 1000:.2f} at 5000")
    assert large <= 1.5 * small, f"{large * 1000:.2f} ms/job at 5000, {small * 1000:.2f} at 500"


def test_squeue_start_under_a_reservation_is_the_plan_made_afresh_at_every_poll():
    """The backfill plan is kept between polls while nothing it turns on changed or passed;
    what squeue --start says is still what a plan made afresh says, poll after poll."""
    from lingua_sweep.sweep import clock, sim_estimates

    clock.use(clock.VirtualClock(start=0.0))
    try:
        maintenance = {"start_s": 1500, "duration_s": 3000, "nodes": 4}
        spec = SimSpec(nodes=6, gpus_per_node=8, duration_s=700, background_load=0.9,
                       background_gpus=8, background_duration_s=900, warmup_s=3600, seed=1,
                       reservations=[maintenance])  # fmt: skip
        sim = SimCluster("sim", spec)
        kept = 0
        for _ in range(1200):  # 100 simulated minutes, a poll every 5 s
            clock.sleep(5.0)
            before = sim.plan_kept
            sim.advance()
            said = sim_estimates.pending_starts(sim)
            now = sim.now()
            afresh = sim_estimates._backfill(sim, sim_estimates._pending(sim), now)
            assert said == {i: sim_estimates._epoch(sim, now, t) for i, t in afresh.items()}
            kept += sim.plan_kept is before
        assert sim.changes > 50 and kept > 900  # jobs came and went; most polls kept the plan
    finally:
        clock.use(clock.WallClock())
