"""Moving a long-pending job, under the faults that used to break it (on the real testbed):
a scancel that fails, the cluster it left freeing up at once, a job that ran while the launcher
slept and was requeued."""

import signal
import subprocess
import time

import pytest
from faults.injectors import CommandFaults, conf_with_faults
from sweep_helpers import (
    cancel_leftovers,
    clean_env,
    hold_node,
    journal_records,
    one_job_per_node,
    slurm,
    wait_for,
)
from test_sweep_dispatch import app_sweep_cmd

from lingua_sweep.sweep import check


def _kinds(sweep_dir) -> list[str]:
    return [r["kind"] for r in journal_records(sweep_dir)]


@pytest.mark.slurm
def test_a_move_waits_for_slurm_and_binds_the_job_to_its_target(tmp_path, testbed):
    """The launcher's scancels fail: the job stays where it is, not moved. Then one lands while
    the launcher sleeps, and alpha (first in priority) frees up: awake, the launcher sees the
    job gone, moves it, and it goes to beta, where it was moved to, not back to alpha."""
    holders: dict[str, list[str]] = {"alpha": [], "beta": []}
    sweep_dir = tmp_path / "sweep"
    faults = CommandFaults(tmp_path / "bin")
    conf = conf_with_faults(testbed, tmp_path / "conf", {"alpha": faults})
    proc = None
    try:
        for cluster in ("alpha", "beta"):
            holders[cluster] += [hold_node(testbed, cluster), hold_node(testbed, cluster)]
        faults.set("scancel", "refuse", message="scancel: error: Socket timed out")
        cmd = app_sweep_cmd(
            testbed,
            sweep_dir,
            "value=7",
            "hydra.launcher.clusters=[alpha,beta]",
            one_job_per_node(testbed),
            "hydra.launcher.max_pending_s=3",
        )
        cmd = [a.replace(f"file://{testbed.conf_dir}", f"file://{conf}") for a in cmd]
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        wait_for(lambda: "submitted" in _kinds(sweep_dir), 60, "the job queued on alpha")
        slurm(testbed, "beta", "scancel", *holders["beta"])  # beta frees up: move there
        wait_for(lambda: faults.calls("scancel") >= 2, 60, "two refused scancels")
        assert "moved" not in _kinds(sweep_dir)  # asked, not confirmed: not moved
        proc.send_signal(signal.SIGSTOP)
        (submitted,) = [r for r in journal_records(sweep_dir) if r["kind"] == "submitted"]
        slurm(testbed, "alpha", "scancel", submitted["job_ids"]["0"])  # one scancel landed
        slurm(testbed, "alpha", "scancel", *holders["alpha"])  # and alpha has room again
        holders["alpha"].clear()
        proc.send_signal(signal.SIGCONT)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        faults.close()
        for cluster, ids in holders.items():
            if ids:
                slurm(testbed, cluster, "scancel", *ids, check=False)
        cancel_leftovers(testbed, sweep_dir)
    assert proc.returncode == 0, output[-3000:]
    records = journal_records(sweep_dir)
    kinds = [r["kind"] for r in records]
    assert kinds.index("stop") < kinds.index("moved")
    assert [r["cluster"] for r in records if r["kind"] == "submitted"] == ["alpha", "beta"]
    (result,) = [r for r in records if r["kind"] == "result"]
    assert (result["status"], result["value"]) == ("COMPLETED", 701)
    assert check.check(sweep_dir) == []


@pytest.mark.slurm
def test_a_requeued_job_the_launcher_never_saw_running_is_not_moved(tmp_path, testbed):
    """The laptop sleeps (launcher SIGSTOPped) while its job starts, is requeued and waits behind
    other jobs: awake, the launcher sees it PENDING for longer than max_pending_s, with room on
    beta. It ran, so it stays where its checkpoints are."""
    sweep_dir = tmp_path / "sweep"
    holders: list[str] = []
    cmd = app_sweep_cmd(testbed, sweep_dir, "value=7", "sleep_s=6",
                        "hydra.launcher.clusters=[alpha,beta]", one_job_per_node(testbed),
                        "hydra.launcher.max_pending_s=3")  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_for(lambda: "submitted" in _kinds(sweep_dir), 60, "the submission")
        proc.send_signal(signal.SIGSTOP)  # the laptop sleeps
        (submitted,) = [r for r in journal_records(sweep_dir) if r["kind"] == "submitted"]
        job_id = submitted["job_ids"]["0"]
        wait_for(lambda: (sweep_dir / "0" / "status.json").exists(), 60, "the job running")
        slurm(testbed, "alpha", "scontrol", "requeue", job_id)
        holders += [hold_node(testbed, "alpha"), hold_node(testbed, "alpha")]
        # Slurm holds a requeued job back for a while (BeginTime): not what this test waits for.
        slurm(testbed, "alpha", "scontrol", "update", f"jobid={job_id}", "StartTime=now")
        time.sleep(5)  # longer than max_pending_s, all of it PENDING
        assert "RUNNING" not in [r.get("state") for r in journal_records(sweep_dir)]
        proc.send_signal(signal.SIGCONT)  # awake
        time.sleep(8)  # several polls and moving rounds
        assert "stop" not in _kinds(sweep_dir) and "moved" not in _kinds(sweep_dir)
        slurm(testbed, "alpha", "scancel", *holders)
        holders.clear()
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        if holders:
            slurm(testbed, "alpha", "scancel", *holders, check=False)
        cancel_leftovers(testbed, sweep_dir)
    assert proc.returncode == 0, output[-3000:]
    records = journal_records(sweep_dir)
    assert [r["cluster"] for r in records if r["kind"] == "submitted"] == ["alpha"]
    assert [r["status"] for r in records if r["kind"] == "result"] == ["COMPLETED"]
    assert check.check(sweep_dir) == []
