"""The README's launcher claims, live on the testbed: an unreachable cluster is skipped, status
mid-sweep shows a remote job's progress, a preempted job is requeued and resumes exactly, the
WandB key is never written or printed."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sweep_helpers import (
    LINGUA_SWEEP,
    REPO,
    TINY,
    clean_env,
    journal_records,
    results_rows,
    slurm,
    status_json,
    sweep_cmd,
    wait_for,
)

RANK_APP = REPO / "tests" / "apps" / "rank_app.py"


@pytest.mark.slurm
def test_an_unreachable_cluster_is_skipped_after_its_probe_timeout(tmp_path, slurm_testbed):
    conf = tmp_path / "conf"
    shutil.copytree(slurm_testbed.conf_dir, conf)
    with socket.socket() as s:  # a login node that refuses at once, on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (conf / "cluster" / "nowhere.yaml").write_text(
        f"name: nowhere\nlogin: 127.0.0.1\nssh_options: [-F, /dev/null, -p, '{port}']\n"
        "partition: batch\ndata_root: /d\noutput_root: /o\npriority: 1\n"
    )
    cmd = [
        sys.executable, str(RANK_APP), "-m", "value=1,2", "hydra/launcher=multicluster",
        f"hydra.searchpath=[file://{conf}]", "hydra.launcher.clusters=[nowhere,alpha]",
        "hydra.launcher.probe_timeout_s=3", "hydra.launcher.poll_interval_s=1",
        "hydra.launcher.live=false", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    t0 = time.monotonic()
    result = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    submitted = [r for r in journal_records(tmp_path / "sweep") if r["kind"] == "submitted"]
    assert {r["cluster"] for r in submitted} == {"alpha"}  # the first in priority, skipped
    results = [r for r in journal_records(tmp_path / "sweep") if r["kind"] == "result"]
    assert sorted(r["value"] for r in results) == [101, 201]


@pytest.mark.slurm
def test_status_mid_sweep_shows_a_remote_jobs_progress(tmp_path, testbed):
    sweep_dir = tmp_path / "sweep"
    cmd = sweep_cmd(testbed, sweep_dir, "optim.lr=1e-3", "steps=100000", "logging.freq=2",
                    "hydra.launcher.clusters=[beta]", "hydra.launcher.detach=true")  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    try:

        def progressing():
            job = status_json(sweep_dir)["jobs"][0]
            return job if job["state"] == "RUNNING" and (job["step"] or 0) >= 4 else None

        job = wait_for(progressing, 120, "the beta job's progress in `status`")
        assert job["cluster"] == "beta" and job["loss"] is not None and job["job_id"] != "-"
        assert not (sweep_dir / "0" / "metrics.jsonl").exists()  # read on beta, not here
    finally:
        subprocess.run([LINGUA_SWEEP, "cancel", str(sweep_dir)], capture_output=True,
                       timeout=120)  # fmt: skip
    assert status_json(sweep_dir, "--offline")["jobs"][0]["state"] == "CANCELLED"


@pytest.mark.slurm
def test_a_preempted_job_is_requeued_and_resumes_exactly(tmp_path, testbed):
    """SIGUSR2 (Slurm's warning before the time limit) -> checkpoint -> requeue -> resume: the
    interrupted job logs exactly the losses of its uninterrupted twin (same config, same seed)."""
    sweep_dir = tmp_path / "sweep"
    cmd = sweep_cmd(testbed, sweep_dir, "seed=42,42", "steps=60", "logging.freq=2",
                    "logging.val_loss_every=20", "checkpoint.dump.every=2",
                    "hydra.launcher.clusters=[alpha]")  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:

        def job0_past_step_10():
            path = sweep_dir / "0" / "metrics.jsonl"
            if not path.exists():
                return None
            steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines()
                     if x.endswith("}")]  # fmt: skip
            return max(steps, default=0) >= 10

        wait_for(job0_past_step_10, 180, "job #0 to pass step 10")
        job_id = next(r for r in journal_records(sweep_dir) if r["kind"] == "submitted")[
            "job_ids"]["0"]  # fmt: skip
        slurm(testbed, "alpha", "scancel", "--signal=USR2", job_id)
        # Slurm holds a requeued job ~2 min (BeginTime); let it start now, the test is not that.
        wait_for(lambda: any(r.get("state") == "PENDING" and r["index"] == 0
                             for r in journal_records(sweep_dir) if r["kind"] == "state"),
                 60, "job #0 requeued")  # fmt: skip
        slurm(testbed, "alpha", "scontrol", "update", f"JobId={job_id}", "StartTime=now")
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()
    states = [r["state"] for r in journal_records(sweep_dir)
              if r["kind"] == "state" and r["index"] == 0]  # fmt: skip
    assert states.count("RUNNING") >= 2, states  # ran, was requeued, ran again
    rows = sorted(results_rows(sweep_dir), key=lambda r: int(r["job"]))
    assert [r["status"] for r in rows] == ["COMPLETED", "COMPLETED"]

    def series(index):
        lines = (sweep_dir / str(index) / "metrics.jsonl").read_text().splitlines()
        return {(r["step"], k): r[k] for r in map(json.loads, lines)
                for k in ("loss/out", "loss/val") if k in r}  # fmt: skip

    assert series(0) == series(1)  # identical to the last bit, steps unique


def test_the_wandb_key_is_never_written_or_printed(tmp_path):
    # Made up at run time: a marker to search for, never a real key, never in the source.
    marker = f"marker-{uuid.uuid4().hex}"
    cmd = [
        sys.executable, str(REPO / "train.py"), "-m", *TINY, "steps=4",
        "logging.wandb.mode=offline", "optim.lr=1e-3,3e-3", "hydra/launcher=multicluster",
        "hydra.launcher.clusters=[local]", "hydra.launcher.poll_interval_s=0.5",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    env = clean_env(WANDB_API_KEY=marker)
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker not in result.stdout + result.stderr
    found = []
    for root, _, files in os.walk(tmp_path / "sweep"):
        for name in files:
            path = Path(root) / name
            if marker.encode() in path.read_bytes():
                found.append(str(path))
    assert not found, found
    assert os.environ.get("WANDB_API_KEY") != marker  # the test process was not changed
