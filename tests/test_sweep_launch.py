"""The multicluster launcher end to end on the real testbed (alpha local, beta over ssh)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from sweep_helpers import (
    REPO,
    TINY,
    cancel_leftovers,
    clean_env,
    hold_node,
    journal_records,
    one_job_per_node,
    results_rows,
    run_sweep,
    sacct_jobs,
    slurm,
    sweep_cmd,
)
from wandb_offline import run_info


def sweep_prefix(sweep_dir) -> str:
    header = journal_records(sweep_dir)[0]
    return f"debug.{header['id']}."


@pytest.mark.slurm
def test_sweep_fills_room_on_both_clusters_and_keeps_going_past_failed_jobs(tmp_path, testbed):
    # One alpha node held and one node per job: alpha has room for one job, beta for two; the
    # fourth queues on alpha (the first cluster). lr=1e6 diverges: those jobs raise.
    holder = hold_node(testbed, "alpha")
    try:
        result = run_sweep(
            tmp_path, testbed, "optim.lr=3e-3,1e6", "optim.scheduler=cosine,wsd",
            "hydra.launcher.clusters=[alpha,beta]", one_job_per_node(testbed), wandb=True,
        )  # fmt: skip
    finally:
        slurm(testbed, "alpha", "scancel", holder)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    assert "sweep summary" in result.stderr and f"lingua-sweep results {sweep_dir}" in result.stderr

    prefix = sweep_prefix(sweep_dir)
    per_cluster = {c: sacct_jobs(testbed, c, prefix, at_least=2) for c in ("alpha", "beta")}
    assert (len(per_cluster["alpha"]), len(per_cluster["beta"])) == (2, 2), per_cluster
    statuses = {}
    for job in range(4):
        job_dir = sweep_dir / str(job)
        st = json.loads((job_dir / "status.json").read_text())
        statuses[job] = (st["status"], st["cluster"])
        assert per_cluster[st["cluster"]][st["job_id"]] == st["status"], (job, per_cluster)
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        lr = next(float(o.split("=")[1]) for o in overrides if o.startswith("optim.lr="))
        if lr > 1:
            assert st["status"] == "FAILED" and "loss is" in st["error"], st
            continue
        info = run_info(job_dir)
        assert info["group"] == f"debug/{st['cluster']}"
        assert info["name"] == f"debug_{st['cluster']}_{st['job_id']}"
        assert info["tags"] == ["testbed", st["cluster"], "cpu", "debug", f"job_{st['job_id']}"]
        lines = (job_dir / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["step"] == 12
    # Jobs in priority order of room: #0 alpha, #1 #2 beta, #3 queued on alpha.
    assert statuses == {
        0: ("COMPLETED", "alpha"), 1: ("COMPLETED", "beta"),
        2: ("FAILED", "beta"), 3: ("FAILED", "alpha"),
    }  # fmt: skip
    table = results_rows(sweep_dir)
    assert sorted(r["status"] for r in table) == ["COMPLETED", "COMPLETED", "FAILED", "FAILED"]
    assert all("loss is nan" in r["error"] for r in table if r["status"] == "FAILED")


@pytest.mark.slurm
def test_dry_run_prints_the_plan_and_submits_nothing(tmp_path, testbed):
    before = {c: sacct_jobs(testbed, c) for c in ("alpha", "beta")}
    result = run_sweep(tmp_path, testbed, "optim.lr=1e-3,3e-3,1e-2",
                       "hydra.launcher.clusters=[alpha,beta]", one_job_per_node(testbed),
                       "hydra.launcher.dry_run=true")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = result.stderr[result.stderr.index("multicluster: jobs") :]
    assert jobs.count("alpha") == 2 and jobs.count("beta") == 1, jobs
    # No Slurm job appeared (sacct's -S window may drop an old cancelled one between calls).
    after = {c: sacct_jobs(testbed, c) for c in ("alpha", "beta")}
    assert {c: set(after[c]) - set(before[c]) for c in after} == {"alpha": set(), "beta": set()}
    assert not (tmp_path / "sweep" / "journal.jsonl").exists()


@pytest.mark.slurm
@pytest.mark.parametrize(
    "bad, message",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("+optim.lrr=1", "unknown config key(s) optim.lrr"),
        ("optim.scheduler=cosine,nope", "optim.scheduler='nope' is not registered"),
        ("model.vocab_size=5", "does not match tokenizer"),
        ("hydra.launcher.clusters=[alpha,nowhere]", "unknown cluster(s) ['nowhere']"),
        ("data.root=/no/such/data", "/no/such/data"),  # checked here and on beta's login node
    ],
)
def test_a_bad_override_is_one_line_and_submits_nothing(tmp_path, testbed, bad, message):
    before = {c: sacct_jobs(testbed, c) for c in ("alpha", "beta")}
    result = run_sweep(tmp_path, testbed, "hydra.launcher.clusters=[alpha,beta]", bad)
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and message in error[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # No Slurm job appeared (sacct's -S window may drop an old cancelled one between calls).
    after = {c: sacct_jobs(testbed, c) for c in ("alpha", "beta")}
    assert {c: set(after[c]) - set(before[c]) for c in after} == {"alpha": set(), "beta": set()}
    assert not (tmp_path / "sweep").exists()  # no journal, study or dir left behind


@pytest.mark.parametrize(
    "args, message",
    [
        (["data.root=/no/such/data"], "data root /no/such/data does not exist (data.root="),
        (["hydra/sweeper=async_optuna", "optim.lr=tag(log,interval(1e-4,1e-2))", "optim.lrr=1"],
         "Key 'lrr' not in 'OptimConfig'"),
        (["hydra.launcher.clusters=[nowhere]"], "unknown cluster(s) ['nowhere']"),
    ],
)  # fmt: skip
def test_a_refused_sweep_says_one_line_once_and_leaves_nothing(tmp_path, args, message):
    cmd = [
        sys.executable, str(REPO / "train.py"), "-m", *TINY, "hydra/launcher=multicluster",
        "hydra.launcher.clusters=[local]", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        # The data check answers on the cluster's thread, seen at the next cycle: the default
        # 5 s poll made this refusal take two of them.
        "hydra.launcher.poll_interval_s=0.2", *args,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "from cluster" not in lines[0]  # the user set that root, not the cluster
    assert not (tmp_path / "sweep").exists()


def test_sweep_without_slurm_runs_on_the_local_cluster_in_slots(tmp_path):
    env = clean_env()  # the embedded default data
    cmd = [
        sys.executable, str(REPO / "train.py"), "-m", *TINY, "logging.wandb=null", "steps=4",
        "optim.lr=1e-3,3e-3,1e-2", "hydra/launcher=multicluster",
        "hydra.launcher.clusters=[local]", "hydra.launcher.poll_interval_s=0.5",
        "hydra.launcher.local_parallel=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = journal_records(tmp_path / "sweep")
    for job in range(3):
        st = json.loads((tmp_path / "sweep" / str(job) / "status.json").read_text())
        assert st["status"] == "COMPLETED" and st["cluster"] == "local"
    results = [r for r in records if r["kind"] == "result"]
    assert all(isinstance(r["value"], float) for r in results) and len(results) == 3
    # Two slots: the third job is submitted only after one of the first two has finished.
    submitted = [r for r in records if r["kind"] == "submitted"]
    assert len(submitted) == 3
    assert submitted[2]["t"] >= min(r["t"] for r in results[:1])


@pytest.mark.slurm
def test_optuna_lr_search_best_is_the_best_row(tmp_path, testbed):
    result = run_sweep(
        tmp_path, testbed, "hydra/sweeper=lr_search", "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2", "hydra.launcher.clusters=[alpha,beta]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    rows = results_rows(tmp_path / "sweep")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"COMPLETED"}
    best_row = min(rows, key=lambda r: float(r["final_val_loss"]))
    assert float(best_row["final_val_loss"]) == pytest.approx(best["best_value"])
    assert float(best_row["optim.lr"]) == pytest.approx(best["best_params"]["optim.lr"], rel=1e-3)


@pytest.mark.slurm
def test_ctrl_c_cancels_queued_and_running_jobs_on_both_clusters(tmp_path, testbed):
    try:
        _ctrl_c_cancels_queued_and_running_jobs(tmp_path, testbed)
    finally:
        cancel_leftovers(testbed, tmp_path / "sweep")  # only what the launcher left behind


def _ctrl_c_cancels_queued_and_running_jobs(tmp_path, testbed):
    sweep_dir = tmp_path / "sweep"
    cmd = sweep_cmd(testbed, sweep_dir, "optim.lr=1e-3,2e-3,3e-3,4e-3,5e-3,6e-3", "steps=100000",
                    "hydra.launcher.clusters=[alpha,beta]", one_job_per_node(testbed),
                    "hydra.launcher.timeout_min=5")  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        running = []
        while time.monotonic() < deadline and len(running) < 4:
            time.sleep(1)
            records = journal_records(sweep_dir)
            running = {r["index"] for r in records if r.get("state") == "RUNNING"}
        assert len(running) == 4, "four jobs never ran (two per cluster)"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 130, output[-3000:]
    prefix = sweep_prefix(sweep_dir)
    time.sleep(2)
    for cluster in ("alpha", "beta"):
        jobs = sacct_jobs(testbed, cluster, prefix, at_least=2)
        assert jobs and set(jobs.values()) == {"CANCELLED"}, (cluster, jobs)
    finals = {r["index"]: r["status"] for r in journal_records(sweep_dir) if r["kind"] == "result"}
    assert finals == dict.fromkeys(range(6), "CANCELLED")


def test_resume_false_starts_afresh_and_keeps_the_earlier_sweep_aside(tmp_path):
    """A new sweep in the same dir never resumes the earlier one's checkpoints, journal or
    study: they move to previous-<time>/, whole."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, str(REPO / "train.py"), "-m", *TINY, "logging.wandb=null", "steps=4",
        "checkpoint.dump.every=2", "optim.lr=1e-3", "hydra/launcher=multicluster",
        "hydra.launcher.clusters=[local]", "hydra.launcher.poll_interval_s=0.5",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    first = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    old_id = journal_records(sweep)[0]["id"]
    assert any((sweep / "0" / "checkpoints").iterdir())
    started = time.time()
    again = subprocess.run([*cmd, "hydra.launcher.resume=false"], cwd=tmp_path, env=clean_env(),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    (aside,) = sweep.glob("previous-*")
    assert journal_records(aside)[0]["id"] == old_id != journal_records(sweep)[0]["id"]
    assert (aside / "0" / "metrics.jsonl").exists()
    records = [json.loads(line) for line in (sweep / "0" / "metrics.jsonl").open()]
    # Trained from step 0 in this run: no record of the earlier one, none resumed at step 4.
    assert records[0]["step"] == 0 and all(r["time"] >= started for r in records)
