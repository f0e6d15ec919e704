"""A durable sweep on the real testbed: kill -9 and resume, cluster faults, status and cancel
from the journal, code snapshots. Faults are real: a failing `sacct` first on the login node's
PATH, beta's sshd stopped and started, the launcher killed with SIGKILL."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import slurm_testbed as testbed_lib
import yaml
from sweep_helpers import (
    LINGUA_SWEEP,
    REPO,
    clean_env,
    hold_node,
    journal_records,
    one_job_per_node,
    results_rows,
    sacct_jobs,
    slurm,
    status_json,
    sweep_cmd,
    wait_for,
)

from lingua_sweep.sweep import remote

LRS = "optim.lr=1e-3,2e-3,3e-3,4e-3,5e-3,6e-3"


@pytest.fixture
def ssh_dir(tmp_path, monkeypatch):
    """A private ControlMaster dir: this test's connections are its own to break."""
    d = Path(f"/tmp/ls-ssh-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    monkeypatch.setenv("LINGUA_SWEEP_SSH_DIR", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def sweep_ids(testbed, sweep_dir: Path) -> dict[str, dict[str, str]]:
    records = journal_records(sweep_dir)
    header = records[0]
    at_least = {}  # the jobs the journal says are final: wait for slurmdbd to know them too
    for r in records:
        if r["kind"] == "submitted":
            finals = {x["index"] for x in records if x["kind"] == "result"}
            n = sum(int(i) in finals for i in r["job_ids"])
            at_least[r["cluster"]] = at_least.get(r["cluster"], 0) + n
    prefix = f"debug.{header['id']}."
    return {c: sacct_jobs(testbed, c, prefix, at_least=at_least.get(c, 0))
            for c in ("alpha", "beta")}  # fmt: skip


@pytest.mark.slurm
def test_kill_9_mid_sweep_then_resume_runs_every_job_exactly_once(tmp_path, testbed, ssh_dir):
    sweep_dir = tmp_path / "sweep"
    cmd = sweep_cmd(testbed, sweep_dir, LRS, "steps=30", "hydra.launcher.clusters=[alpha,beta]",
                    one_job_per_node(testbed))  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        # Right after the first cluster's submission is written down: beta's may be under way.
        wait_for(lambda: any(r["kind"] == "submitted" for r in journal_records(sweep_dir)), 120,
                 "a submission")  # fmt: skip
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    resumed = subprocess.run([LINGUA_SWEEP, "resume", str(sweep_dir)], cwd=tmp_path,
                             env=clean_env(LINGUA_SWEEP_SSH_DIR=str(ssh_dir)),
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ids = sweep_ids(testbed, sweep_dir)
    # Every job ran once in sacct. Time-to-result may move a job still pending to where it
    # finishes sooner: its cancelled Slurm id is a move the journal records, never a run.
    seen = {(c, i): state for c in ids for i, state in ids[c].items()}
    moved = {(r["cluster"], r["job_id"]) for r in journal_records(sweep_dir)
             if r["kind"] == "moved"}  # fmt: skip
    assert sum(state == "COMPLETED" for state in seen.values()) == 6, ids
    assert {i for i, state in seen.items() if state != "COMPLETED"} <= moved, (ids, moved)
    assert all(state in ("COMPLETED", "CANCELLED") for state in seen.values()), ids
    rows = results_rows(sweep_dir)
    assert sorted(int(r["job"]) for r in rows) == list(range(6))
    assert {r["status"] for r in rows} == {"COMPLETED"}

    # A rerun of the finished sweep submits nothing and returns the same results.
    records = len(journal_records(sweep_dir))
    again = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert sweep_ids(testbed, sweep_dir) == ids
    new = journal_records(sweep_dir)[records:]
    assert [r["kind"] for r in new] == ["resumed"]


@pytest.mark.slurm
def test_sweep_completes_through_a_failing_sacct_and_a_stopped_sshd(tmp_path, testbed, ssh_dir):
    # beta's login node gets an `sacct` first on PATH that fails every other call.
    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sacct").write_text(
        "#!/bin/sh\n"
        f"n=$(( $(cat {fault}/calls 2>/dev/null || echo 0) + 1 )); echo $n > {fault}/calls\n"
        'if [ $((n % 2)) -eq 1 ]; then echo "sacct: error: slurmdbd: connection refused" >&2;'
        " exit 1; fi\n"
        'exec /usr/bin/sacct "$@"\n'
    )
    (fault / "sacct").chmod(0o755)
    conf = tmp_path / "conf"
    shutil.copytree(testbed.conf_dir, conf)
    beta = yaml.safe_load((conf / "cluster" / "beta.yaml").read_text())
    beta["env"] = {"PATH": f"{fault}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    (conf / "cluster" / "beta.yaml").write_text(yaml.safe_dump(beta))

    sweep_dir = tmp_path / "sweep"
    cmd = sweep_cmd(
        testbed, sweep_dir, "optim.lr=1e-3,3e-3,1e-2", "steps=30",
        "hydra.launcher.clusters=[beta]", conf_dir=conf,
    )  # fmt: skip
    out = open(tmp_path / "launcher.log", "w")  # noqa: SIM115 (the launcher writes to it)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(LINGUA_SWEEP_SSH_DIR=str(ssh_dir)),
                            stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    lay = testbed_lib._Layout(testbed.state_dir)
    try:
        wait_for(lambda: any(r["kind"] == "submitted" for r in journal_records(sweep_dir)), 120,
                 "the submission to beta")  # fmt: skip
        pid, exe = (lay.run / "sshd.pid").read_text().split()
        os.kill(int(pid), signal.SIGTERM)  # beta's login node goes away...
        remote.close_master(testbed.beta_login, ["-F", str(testbed.ssh_config)])
        time.sleep(20)  # ...for 20 s, while its jobs run and finish
    finally:
        testbed_lib._start_sshd(lay)
        wait_for(lambda: testbed_lib._ssh_ok(lay), 30, "sshd back")
    try:
        proc.wait(timeout=300)
    finally:
        proc.kill()
        out.close()
    log = (tmp_path / "launcher.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "cluster beta does not answer" in log and "cluster beta answers again" in log, log[
        -3000:
    ]
    assert int((fault / "calls").read_text()) >= 2  # the failing sacct was really in the way
    rows = results_rows(sweep_dir)
    assert [r["status"] for r in sorted(rows, key=lambda r: r["job"])] == ["COMPLETED"] * 3
    assert len(sweep_ids(testbed, sweep_dir)["beta"]) == 3


@pytest.mark.slurm
def test_detached_sweep_status_and_cancel_work_from_the_journal(tmp_path, testbed, ssh_dir):
    holders = [hold_node(testbed, "alpha"), hold_node(testbed, "alpha")]
    try:
        sweep_dir = tmp_path / "sweep"
        result = subprocess.run(
            sweep_cmd(testbed, sweep_dir, "optim.lr=1e-3,3e-3", "hydra.launcher.clusters=[alpha]",
                      one_job_per_node(testbed), "hydra.launcher.detach=true"),
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"lingua-sweep status {sweep_dir}" in result.stdout
        status = status_json(sweep_dir)
        assert [(j["index"], j["state"]) for j in status["jobs"]] == [
            (0, "PENDING"),
            (1, "PENDING"),
        ]
        ids = [j["job_id"] for j in status["jobs"]]
        queued = slurm(testbed, "alpha", "squeue", "-h", "-r", "-o", "%i").split()
        assert set(ids) <= set(queued)

        cancel = subprocess.run([LINGUA_SWEEP, "cancel", str(sweep_dir)], capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert cancel.returncode == 0 and "2 job(s) cancelled" in cancel.stdout, cancel.stderr
        queued = slurm(testbed, "alpha", "squeue", "-h", "-r", "-o", "%i").split()
        assert not set(ids) & set(queued)
        assert [j["state"] for j in status_json(sweep_dir, "--offline")["jobs"]] == [
            "CANCELLED"
        ] * 2
    finally:
        slurm(testbed, "alpha", "scancel", *holders)


@pytest.mark.slurm
def test_a_submission_the_launcher_never_wrote_down_is_found_by_its_name(tmp_path, testbed):
    """kill -9 between sbatch and writing the ids: the intent's job name finds the job."""
    sweep_dir = tmp_path / "sweep"
    holders = [hold_node(testbed, "alpha"), hold_node(testbed, "alpha")]
    try:
        result = subprocess.run(
            sweep_cmd(testbed, sweep_dir, "optim.lr=1e-3", "hydra.launcher.clusters=[alpha]",
                      one_job_per_node(testbed), "hydra.launcher.detach=true"),
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        # Rewrite the journal as a launcher killed right after sbatch would have left it.
        lines = (sweep_dir / "journal.jsonl").read_text().splitlines()
        kept = [line for line in lines if '"kind":"submitted"' not in line
                and '"kind":"state"' not in line]  # fmt: skip
        (sweep_dir / "journal.jsonl").write_text("\n".join(kept) + "\n")
        assert status_json(sweep_dir, "--offline")["jobs"][0]["state"] == "SUBMITTING"
        cancel = subprocess.run([LINGUA_SWEEP, "cancel", str(sweep_dir)], capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert cancel.returncode == 0, cancel.stderr
        ((job_id, state),) = sweep_ids(testbed, sweep_dir)["alpha"].items()
        assert state == "CANCELLED"
        assert status_json(sweep_dir, "--offline")["jobs"][0]["job_id"] == job_id
    finally:
        slurm(testbed, "alpha", "scancel", *holders)


def _copy_project(dest: Path, marker: str) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    (dest / "MARKER").write_text(marker)
    return dest


@pytest.mark.slurm
def test_two_sweeps_keep_their_own_code_on_the_login_node(tmp_path, testbed, ssh_dir):
    snapshots = {}
    for marker in ("first", "second"):
        project = _copy_project(tmp_path / marker, marker)
        sweep_dir = tmp_path / f"sweep-{marker}"
        result = subprocess.run(
            sweep_cmd(testbed, sweep_dir, "optim.lr=1e-3", "steps=4",
                      "hydra.launcher.clusters=[beta]", script=project / "train.py"),
            cwd=project, env=clean_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        (code,) = [r for r in journal_records(sweep_dir) if r["kind"] == "code"]
        snapshots[marker] = code["snapshot"]
        (job_id,) = sweep_ids(testbed, sweep_dir)["beta"]
        workdir = slurm(testbed, "beta", "sacct", "-X", "-n", "-P", "-j", job_id, "-o", "WorkDir")
        assert workdir.strip() == code["snapshot"]  # the job ran in its sweep's snapshot
        header = journal_records(sweep_dir)[0]
        assert header["code"]["root"] == str(project)
    assert snapshots["first"] != snapshots["second"]
    for marker, snapshot in snapshots.items():  # the second sweep changed nothing of the first
        assert slurm(testbed, "beta", "cat", f"{snapshot}/MARKER") == marker


def test_a_sweep_that_ran_on_slurm_never_falls_back_to_this_machine():
    """No Slurm cluster answers (a network blip): jobs of a sweep that ran on one wait for it,
    they do not train here on other data, unless `local` was named."""
    from types import SimpleNamespace

    from lingua_sweep.sweep.dispatch import Dispatcher
    from lingua_sweep.sweep.journal import replay
    from lingua_sweep.sweep.params import LauncherParams

    registry = {"alpha": SimpleNamespace(slurm=True), "local": SimpleNamespace(slurm=False)}
    fresh = replay([])
    used = replay([])
    used.known_ids[("alpha", "12")] = 0

    def local_ok(state, reachable, **params):
        c = SimpleNamespace(p=LauncherParams(**params), registry=registry, state=state)
        return Dispatcher(c)._local_ok(reachable)

    assert local_ok(fresh, [])  # a laptop with no Slurm at all: here
    assert not local_ok(used, [])  # ran on alpha: wait for it
    assert local_ok(used, [], clusters=["alpha", "local"])  # named: the user's choice
    assert not local_ok(fresh, ["alpha"])  # Slurm answers: never here
