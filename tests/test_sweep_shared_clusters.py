"""Slurm as shared clusters run it, on the testbed: preemption (CANCEL on alpha, REQUEUE on
beta), a node going DOWN under a job, QOS limits per user, MaxArraySize."""

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sweep_helpers import (
    LINGUA_SWEEP,
    REPO,
    cancel_leftovers,
    clean_env,
    hold_node,
    journal_records,
    one_job_per_node,
    results_rows,
    slurm,
    status_json,
    sweep_cmd,
    wait_for,
)

pytestmark = pytest.mark.slurm
APP = REPO / "tests" / "apps" / "rank_app.py"
# Long enough for Slurm to decide a preemption (its backfill runs every 2 s here), short enough
# for the suite: ~30 s of training per job; one thread each, as two jobs share two cores.
SLOW = ["steps=6000", "logging.freq=100", "logging.val_loss_every=3000",
        "checkpoint.dump.every=200",
        'hydra.launcher.setup=["export OMP_NUM_THREADS=1"]']  # fmt: skip


def app_cmd(testbed, sweep_dir: Path, conf: Path, *args: str) -> list[str]:
    return [sys.executable, str(APP), "-m", "hydra/launcher=multicluster",
            f"hydra.searchpath=[file://{conf}]", "hydra.launcher.poll_interval_s=0.5",
            "hydra.launcher.probe_every_s=2", f"hydra.sweep.dir={sweep_dir}", *args]  # fmt: skip


def conf_with(testbed, dest: Path, cluster: str, **settings) -> Path:
    """A copy of the testbed's cluster definitions with `settings` changed for one cluster."""
    import shutil

    shutil.copytree(testbed.conf_dir, dest, dirs_exist_ok=True)
    path = dest / "cluster" / f"{cluster}.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **settings}))
    return dest


def beta_slower(testbed, dest: Path, factor: float) -> Path:
    """The testbed's clusters with alpha as fast as an H100 node (what `expected_run_s` is
    measured on) and beta `factor` times slower."""
    h100 = 140e12
    conf = conf_with(testbed, dest, "alpha", model_flops_per_s=h100)
    beta = conf / "cluster" / "beta.yaml"
    beta.write_text(yaml.safe_dump({**yaml.safe_load(beta.read_text()),
                                    "model_flops_per_s": h100 / factor}))  # fmt: skip
    return conf


def one_job_on_alpha_or_beta(
    testbed, cwd: Path, sweep_dir: Path, conf: Path, sleep_s: float, *overrides: str
):
    """One rank_app job that the launcher places on alpha or beta (10 s on an H100 node)."""
    cmd = app_cmd(testbed, sweep_dir, conf, "value=1", f"sleep_s={sleep_s}",
                  "hydra.launcher.clusters=[alpha,beta]", "hydra.launcher.expected_run_s=10",
                  f"hydra.launcher.cpus_per_task={testbed.cpus_per_node}",
                  *overrides)  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


@contextlib.contextmanager
def capped_qos(testbed, **limits):
    """QOS `capped` with these per-user limits (sacctmgr names) for the block, then none."""

    def sacctmgr(values):
        slurm(testbed, "alpha", "sacctmgr", "-i", "modify", "qos", "capped", "set",
              *(f"{k}={v}" for k, v in values.items()))  # fmt: skip

    sacctmgr(limits)
    try:
        yield
    finally:
        sacctmgr(dict.fromkeys(limits, -1))


@contextlib.contextmanager
def maintenance_on_alpha(testbed, starts_in_s: int):
    """A maintenance reservation on alpha's batch nodes, beginning in `starts_in_s` and lasting
    an hour, for the block; yields those nodes."""
    import uuid

    batch = [n for n in testbed.node_names if n.startswith("alpha") and n not in testbed.gpu_nodes]
    name = f"maint-{uuid.uuid4().hex[:8]}"
    slurm(testbed, "alpha", "scontrol", "create", "reservation", f"ReservationName={name}",
          f"StartTime=now+{starts_in_s}", "Duration=60", f"Nodes={','.join(batch)}",
          "Flags=MAINT", "Users=root")  # fmt: skip
    try:
        yield batch
    finally:
        slurm(testbed, "alpha", "scontrol", "delete", f"ReservationName={name}", check=False)


def planned_forecast(sweep_dir: Path) -> dict:
    """The prediction the launcher placed the sweep's one job by."""
    [planned] = [r["jobs"]["0"] for r in journal_records(sweep_dir)
                 if r["kind"] == "forecast" and r["jobs"].get("0", {}).get("planned")]  # fmt: skip
    return planned


def check_sweep(sweep_dir: Path) -> None:
    out = subprocess.run([LINGUA_SWEEP, "check", str(sweep_dir)], capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def steps_logged(job_dir: Path) -> list[int]:
    lines = (job_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss/out" in r]


def node_of(testbed, cluster: str, job_id: str) -> str:
    return slurm(testbed, cluster, "squeue", "-h", "-j", job_id, "-o", "%N").strip()


def test_preempted_jobs_are_resubmitted_or_requeued_and_resume_from_their_checkpoints(
    tmp_path, testbed
):
    """alpha cancels a preempted job: the launcher submits it again, in its own dir, on alpha.
    beta requeues a preempted job itself, unless it ended first (the trainer checkpoints on
    SIGTERM and exits within the grace time): then the launcher submits it again. Either way
    each resumes from the checkpoint written on SIGTERM."""
    sweep_dir = tmp_path / "sweep"
    held = hold_node(testbed, "alpha")  # one alpha node: job #0 there, job #1 on beta
    cmd = sweep_cmd(testbed, sweep_dir, "seed=1,2", *SLOW, one_job_per_node(testbed),
                    "hydra.launcher.clusters=[alpha,beta]")  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:

        def both_checkpointed():
            ids, dirs = {}, {0: sweep_dir / "0", 1: sweep_dir / "1"}
            for r in journal_records(sweep_dir):
                if r["kind"] == "submitted":
                    ids.update({int(i): (r["cluster"], j) for i, j in r["job_ids"].items()})
                    dirs.update({int(i): Path(d) for i, d in (r["remote_dirs"] or {}).items()})
            ckpts = [dirs[i] / "checkpoints" for i in (0, 1)]  # beta's: on its filesystem
            if len(ids) == 2 and all(p.is_dir() and any(p.iterdir()) for p in ckpts):
                return ids
            return None

        ids = wait_for(both_checkpointed, 120, "both jobs to write a checkpoint")
        assert {c for c, _ in ids.values()} == {"alpha", "beta"}, ids
        slurm(testbed, "alpha", "scancel", held)
        for cluster, job_id in ids.values():  # a high-priority job wants the job's node
            slurm(testbed, cluster, "sbatch", "-p", "urgent", "-N1", "--exclusive",
                  "-w", node_of(testbed, cluster, job_id), "-o", "/dev/null",
                  "--wrap", "sleep 1")  # fmt: skip
        beta_index = next(i for i, (c, _) in ids.items() if c == "beta")

        def beta_back():
            # Requeued by Slurm if the job outlived the grace time, else submitted again by
            # the launcher (the trainer checkpoints and exits within it: Slurm calls it FAILED).
            for r in journal_records(sweep_dir):
                if r.get("index") == beta_index and r["kind"] == "resubmit":
                    return "resubmitted"
                if r.get("index") == beta_index and r.get("reason") == "BeginTime":
                    return "requeued"
            return None

        if wait_for(beta_back, 90, "beta's job back in a queue") == "requeued":
            # Slurm holds a requeued job ~2 minutes; this test is not about that.
            slurm(testbed, "beta", "scontrol", "update", f"JobId={ids[beta_index][1]}",
                  "StartTime=now")  # fmt: skip
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    finally:
        proc.kill()
        cancel_leftovers(testbed, sweep_dir)
        slurm(testbed, "alpha", "scancel", held, check=False)
    records = journal_records(sweep_dir)
    alpha_index = 1 - beta_index
    resubmits = {r["index"]: r for r in records if r["kind"] == "resubmit"}
    assert resubmits[alpha_index]["to"] == "alpha", resubmits
    assert resubmits[alpha_index]["reason"] == "preempted"
    assert resubmits.get(beta_index, {"to": "beta"})["to"] == "beta"
    assert [r["status"] for r in results_rows(sweep_dir)] == ["COMPLETED", "COMPLETED"]
    for index in (0, 1):
        steps = steps_logged(sweep_dir / str(index))
        assert steps == list(range(100, 6001, 100)), steps  # every step once, none repeated
        log = (sweep_dir / str(index) / "train.log").read_text()
        assert "resumed from" in log, f"job #{index} started over instead of resuming"
    check_sweep(sweep_dir)


def test_a_job_lost_with_its_node_is_submitted_again(tmp_path, testbed):
    """A node set DOWN under a job that Slurm may not requeue (--no-requeue): NODE_FAIL, and
    the launcher submits it again; it completes."""
    sweep_dir = tmp_path / "sweep"
    cmd = app_cmd(testbed, sweep_dir, testbed.conf_dir, "value=1", "sleep_s=8",
                  "hydra.launcher.clusters=[alpha]",
                  "+hydra.launcher.additional_parameters.no_requeue=true")  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:

        def running():
            states = [r for r in journal_records(sweep_dir) if r["kind"] == "state"]
            return next((r for r in states if r["state"] == "RUNNING"), None)

        wait_for(running, 60, "the job to start")
        job_id = next(r for r in journal_records(sweep_dir) if r["kind"] == "submitted")[
            "job_ids"]["0"]  # fmt: skip
        node = node_of(testbed, "alpha", job_id)
        slurm(testbed, "alpha", "scontrol", "update", f"NodeName={node}", "State=DOWN",
              "Reason=lingua-test")  # fmt: skip
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    finally:
        proc.kill()
        cancel_leftovers(testbed, sweep_dir)
    resubmits = [r for r in journal_records(sweep_dir) if r["kind"] == "resubmit"]
    assert len(resubmits) == 1 and resubmits[0]["reason"] == "node failure", resubmits
    assert [r["status"] for r in results_rows(sweep_dir)] == ["COMPLETED"]
    check_sweep(sweep_dir)


def test_per_user_limits_are_kept_and_the_qos_reason_is_shown(tmp_path, testbed):
    """MaxSubmitJobsPerUser=2, MaxJobsPerUser=1: six jobs go through two at a time in the
    queue (never a refused sbatch), and `status` says why the second one waits."""
    sweep_dir = tmp_path / "sweep"
    conf = conf_with(testbed, tmp_path / "conf", "alpha", qos="capped")
    cmd = app_cmd(testbed, sweep_dir, conf, "value=1,2,3,4,5,6", "sleep_s=3",
                  "hydra.launcher.clusters=[alpha]")  # fmt: skip
    with capped_qos(testbed, MaxJobsPerUser=1, MaxSubmitJobsPerUser=2):
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:

            def qos_reason_in_status():
                if not (sweep_dir / "journal.jsonl").exists():
                    return None
                notes = [j["note"] for j in status_json(sweep_dir)["jobs"]]
                return next((n for n in notes if "QOSMaxJobsPerUserLimit" in n), None)

            note = wait_for(qos_reason_in_status, 60, "status to show the QOS reason")
            # (then, under time-to-result, when it should start)
            assert note.startswith("QOS limit: running jobs per user (QOSMaxJobsPerUserLimit)")
            assert proc.wait(timeout=180) == 0, proc.stderr.read()[-3000:]
        finally:
            proc.kill()
            cancel_leftovers(testbed, sweep_dir)
    records = journal_records(sweep_dir)
    assert [r for r in records if r["kind"] == "unsubmitted"] == []  # no refusal at all
    assert [r["status"] for r in results_rows(sweep_dir)] == ["COMPLETED"] * 6
    check_sweep(sweep_dir)


@pytest.mark.parametrize("placement", ["priority", "time_to_result"])
def test_a_job_behind_a_qos_limit_goes_where_there_is_room_within_a_probe(
    tmp_path, testbed, placement
):
    """alpha's QOS lets one job run; beta is full with jobs of no time limit (Slurm says a year).
    The second job waits for alpha: `priority` queues it there behind the limit; time-to-result
    keeps it here for its turn (our job there ends by its time limit at the latest; it once went
    to beta's year-long queue). Once beta frees a node it goes there at the next probe, not after
    max_pending_s."""
    sweep_dir = tmp_path / "sweep"
    conf = conf_with(testbed, tmp_path / "conf", "alpha", qos="capped")
    holds = [hold_node(testbed, "beta"), hold_node(testbed, "beta")]
    cmd = app_cmd(testbed, sweep_dir, conf, "value=1,2", "sleep_s=25",
                  "hydra.launcher.clusters=[alpha,beta]", f"hydra.launcher.placement={placement}",
                  f"hydra.launcher.cpus_per_task={testbed.cpus_per_node}")  # fmt: skip
    with capped_qos(testbed, MaxJobsPerUser=1):
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:

            def waiting_for_alpha():
                records = journal_records(sweep_dir)
                if placement == "priority":
                    return any(r["kind"] == "state" and r.get("reason") == "QOSMaxJobsPerUserLimit"
                               for r in records)  # fmt: skip
                # placed (and held here) at least twice since the first job started
                started = next((r["t"] for r in records if r["kind"] == "state"
                                and r["state"] == "RUNNING"), None)  # fmt: skip
                return started is not None and time.time() > started + 5

            wait_for(waiting_for_alpha, 60, "the second job to wait for alpha")
            sent_to = {i: r["cluster"] for r in journal_records(sweep_dir)
                       if r["kind"] == "intent" for i in r["indices"]}  # fmt: skip
            assert sent_to == ({0: "alpha", 1: "alpha"} if placement == "priority"
                               else {0: "alpha"}), sent_to  # fmt: skip
            freed = time.time()
            slurm(testbed, "beta", "scancel", *holds)

            def sent_to_beta():
                records = journal_records(sweep_dir)
                return next((r for r in records if r["kind"] == "intent" and r["t"] > freed), None)

            sent = wait_for(sent_to_beta, 30, "the job to go to beta")
            assert sent["cluster"] == "beta" and sent["indices"] == [1], sent
            # a probe (2 s) and a poll after beta's nodes are free; not max_pending_s (600 s)
            assert sent["t"] - freed < 15, sent["t"] - freed
            if placement == "priority":
                moved = next(r for r in journal_records(sweep_dir) if r["kind"] == "stop")
                assert moved["to"] == "beta" and "QOSMaxJobsPerUserLimit" in moved["note"], moved
            assert proc.wait(timeout=180) == 0, proc.stderr.read()[-3000:]
        finally:
            proc.kill()
            cancel_leftovers(testbed, sweep_dir)
            slurm(testbed, "beta", "scancel", *holds, check=False)
    rows = results_rows(sweep_dir)
    assert [r["status"] for r in rows] == ["COMPLETED", "COMPLETED"]
    assert [r["cluster"] for r in rows] == ["alpha", "beta"]
    check_sweep(sweep_dir)


def test_arrays_are_split_to_fit_max_array_size(tmp_path, testbed):
    from slurm_testbed import set_slurm_conf

    sweep_dir = tmp_path / "sweep"
    cmd = app_cmd(testbed, sweep_dir, testbed.conf_dir, "value=1,2,3,4,5,6,7",
                  "hydra.launcher.clusters=[alpha]")  # fmt: skip
    set_slurm_conf("alpha", {"MaxArraySize": "3"}, testbed.state_dir)
    try:
        out = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True,
                             text=True, timeout=180)  # fmt: skip
    finally:
        set_slurm_conf("alpha", {"MaxArraySize": None}, testbed.state_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    records = journal_records(sweep_dir)
    sizes = [len(r["job_ids"]) for r in records if r["kind"] == "submitted"]
    assert sum(sizes) == 7 and max(sizes) <= 3, sizes
    assert [r for r in records if r["kind"] == "unsubmitted"] == []
    assert [r["status"] for r in results_rows(sweep_dir)] == ["COMPLETED"] * 7
    check_sweep(sweep_dir)


def test_a_job_waits_for_the_busy_fast_cluster_when_it_finishes_there_first(tmp_path, testbed):
    """alpha is busy with another user's jobs that asked for one minute, so Slurm says it frees
    in ~60 s; beta is free but marked 20x slower (200 s for this job against alpha's 10). The
    job queues on alpha, starts about when Slurm said, and the prediction is recorded and
    scored (`placement=priority` would have sent it to beta at once)."""
    sweep_dir = tmp_path / "sweep"
    conf = beta_slower(testbed, tmp_path / "conf", 20)
    holds = []
    try:
        for _ in range(2):  # both of alpha's batch nodes, each for its one-minute limit
            out = slurm(testbed, "alpha", "sbatch", "--parsable", "-p", "batch", "-N1", "--time=1",
                        "--exclusive", "--output=/dev/null", "--wrap", "sleep 600")  # fmt: skip
            holds.append(out.strip().split(";")[0])
        states = ["squeue", "-h", "-j", ",".join(holds), "-o", "%T"]
        wait_for(lambda: slurm(testbed, "alpha", *states).split() == ["RUNNING"] * 2, 30,
                 "alpha held")  # fmt: skip
        one_job_on_alpha_or_beta(testbed, tmp_path, sweep_dir, conf, sleep_s=10)
    finally:
        cancel_leftovers(testbed, sweep_dir)
        if holds:
            slurm(testbed, "alpha", "scancel", *holds, check=False)
    [job] = status_json(sweep_dir)["jobs"]
    assert job["cluster"] == "alpha" and job["state"] == "COMPLETED", job
    planned = planned_forecast(sweep_dir)
    assert planned["cluster"] == "alpha" and planned["slurm_start"] > planned["at"] + 30
    assert planned["alt"]["beta"] - planned["at"] == pytest.approx(200, abs=5)
    started = next(r["t"] for r in journal_records(sweep_dir)
                   if r["kind"] == "state" and r["state"] == "RUNNING")  # fmt: skip
    # slurmctld enforces time limits every 30 s: the holds end up to that late.
    assert abs(started - planned["start"]) < 45, (started, planned)
    ended = next(r["t"] for r in journal_records(sweep_dir) if r["kind"] == "result")
    assert ended < planned["alt"]["beta"]  # it did finish before it would have on beta
    res = subprocess.run([LINGUA_SWEEP, "results", str(sweep_dir), "--format", "md"],
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    assert "prediction error" in res and "| alpha | 1 |" in res, res
    check_sweep(sweep_dir)


def test_idle_nodes_held_for_a_maintenance_reservation_send_the_job_elsewhere(tmp_path, testbed):
    """alpha's batch nodes are idle to sinfo, but a maintenance reservation begins in two
    minutes, within the job's time limit, and lasts an hour: Slurm would start the job after
    it (its `sbatch --test-only` says so). beta is free but marked 3x slower. Time-to-result
    sends the job to beta at once, where it finishes before alpha's reservation even ends;
    sinfo's room alone (alpha: faster and preferred) would have parked it for an hour."""
    from lingua_sweep.sweep.journal import Journal

    sweep_dir = tmp_path / "sweep"
    conf = beta_slower(testbed, tmp_path / "conf", 3)
    with maintenance_on_alpha(testbed, starts_in_s=120) as batch:
        try:
            states = slurm(testbed, "alpha", "sinfo", "-h", "-p", "batch", "-N", "-o",
                           "%t").split()  # fmt: skip
            assert states == ["idle"] * len(batch)  # sinfo's room: nothing says "reserved" yet
            one_job_on_alpha_or_beta(testbed, tmp_path, sweep_dir, conf, sleep_s=2)
            reserved_until = time.time() + 3660
        finally:
            cancel_leftovers(testbed, sweep_dir)
    [job] = status_json(sweep_dir)["jobs"]
    assert job["cluster"] == "beta" and job["state"] == "COMPLETED", job
    assert Journal(sweep_dir).replay().jobs[0].moves == 0  # placed there, not moved there
    planned = planned_forecast(sweep_dir)
    assert planned["cluster"] == "beta" and planned["run_s"] == pytest.approx(30, abs=1)
    # alpha as Slurm put it: after the reservation (an hour from ~2 minutes on), plus 10 s
    assert planned["alt"]["alpha"] == pytest.approx(reserved_until + 10, abs=120)
    ended = next(r["t"] for r in journal_records(sweep_dir) if r["kind"] == "result")
    assert ended < planned["alt"]["alpha"]
    check_sweep(sweep_dir)


def test_idle_nodes_free_until_a_reservation_take_a_job_that_ends_before_it(tmp_path, testbed):
    """A maintenance reservation on alpha's batch nodes begins in ten minutes; two jobs with
    an hour's limit wait for its end (ReqNodeNotAvail). `sbatch --test-only` tells a 5-minute
    job an hour too (it plans those two first), yet Slurm starts one at once: the reservation
    (`scontrol show reservation`) decides, so the job goes to alpha (faster, preferred), not
    to beta (free, 3x slower)."""
    sweep_dir = tmp_path / "sweep"
    conf = beta_slower(testbed, tmp_path / "conf", 3)
    waiting = []
    with maintenance_on_alpha(testbed, starts_in_s=600) as batch:
        try:
            for _ in batch:
                out = slurm(testbed, "alpha", "sbatch", "--parsable", "-p", "batch", "-N1",
                            "--exclusive", "--time=60", "--output=/dev/null",
                            "--wrap", "sleep 600")  # fmt: skip
                waiting.append(out.strip().split(";")[0])
            reasons = ["squeue", "-h", "-j", ",".join(waiting), "-o", "%r"]
            wait_for(lambda: slurm(testbed, "alpha", *reasons).splitlines()
                     == ["ReqNodeNotAvail, Reserved for maintenance"] * len(batch), 30,
                     "the hour-long jobs to wait for the reservation")  # fmt: skip
            test_only = slurm(testbed, "alpha", "sbatch", "--test-only", "-p", "batch", "-N1",
                              "--exclusive", "--time=5", "--wrap", "true",
                              stderr=True)  # fmt: skip
            asked = time.time()
            one_job_on_alpha_or_beta(testbed, tmp_path, sweep_dir, conf, 2,
                                     "hydra.launcher.timeout_min=5")  # fmt: skip
        finally:
            cancel_leftovers(testbed, sweep_dir)
            if waiting:
                slurm(testbed, "alpha", "scancel", *waiting, check=False)
    from lingua_sweep.sweep.slurm_queries import slurm_time

    said = slurm_time(test_only.split(" to start at ")[1].split()[0])
    assert said > asked + 1800, test_only  # what sbatch --test-only says: after the reservation
    [job] = status_json(sweep_dir)["jobs"]
    assert job["cluster"] == "alpha" and job["state"] == "COMPLETED", job
    planned = planned_forecast(sweep_dir)
    assert planned["cluster"] == "alpha" and planned["start"] == planned["at"], planned
    check_sweep(sweep_dir)
