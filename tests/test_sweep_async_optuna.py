"""`hydra/sweeper=async_optuna` end to end: trials start as slots free up, failed and pruned
trials, a study that survives its launcher. The local cluster where Slurm adds nothing; pruning
(scancel, metrics over ssh) on the real testbed.

Where the trainer is what a trial does (a diverging trial, a Ctrl-C that reaches the trainer,
its config mistakes) the trials train; where the sweeper's bookkeeping is the subject (when the
next trial starts, what a resumed launcher adopts) they are tests/apps/rank_app.py sleeping
`sleep_s`: the same sweeper and launcher, without the ~2.5 s of CPU a trainer takes to start.
"""

import json
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest
import yaml
from sweep_helpers import (
    REPO,
    TINY,
    clean_env,
    journal_records,
    one_job_per_node,
    results_rows,
    sacct_jobs,
    sweep_cmd,
)

BASE = [o for o in TINY if not o.startswith(("steps=", "logging.val_loss_every="))]
POLL_S = 0.5


def local_cmd(sweep_dir, *args: str) -> list[str]:
    return [
        sys.executable, str(REPO / "train.py"), "-m", *BASE, "logging.wandb=null",
        "hydra/launcher=multicluster", "hydra.launcher.clusters=[local]",
        "hydra.launcher.local_parallel=2", f"hydra.launcher.poll_interval_s={POLL_S}",
        "hydra/sweeper=async_optuna", "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={sweep_dir}",
        *args,
    ]  # fmt: skip


RANK_APP = REPO / "tests" / "apps" / "rank_app.py"
APP_STUDY = "rank_app"  # the app's study: named after its config, as "debug" is the trainer's


def app_cmd(sweep_dir, *args: str) -> list[str]:
    """local_cmd's sweep of rank_app: a trial returns `value * 100 + 1` after `sleep_s`."""
    return [
        sys.executable, str(RANK_APP), "-m", "hydra/launcher=multicluster",
        "hydra.launcher.clusters=[local]", "hydra.launcher.local_parallel=2",
        f"hydra.launcher.poll_interval_s={POLL_S}", "hydra/sweeper=async_optuna",
        "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={sweep_dir}", *args,
    ]  # fmt: skip


def env() -> dict[str, str]:
    # One thread per job: two jobs' thread pools spinning on 2 cores slow each other down 20x.
    return clean_env(OMP_NUM_THREADS="1")


def run_local(tmp_path, *args: str, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(local_cmd(tmp_path / "sweep", *args), cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def study_of(sweep_dir, name="debug") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_next_trial_starts_within_one_poll_of_a_trial_ending(tmp_path):
    # Seeded random sampling gives trials of 5, 0.1 and 5 s: the short one ends while the first
    # long one runs, and its slot must go to the third trial at once.
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        app_cmd(sweep, "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
                "hydra.sweeper.n_trials=3", "sleep_s=choice(0.1,5)"),
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = journal_records(sweep)
    jobs = {r["index"]: r for r in records if r["kind"] == "job"}
    assert sorted(jobs) == [0, 1, 2] and [jobs[i]["trial"] for i in range(3)] == [0, 1, 2]
    sleeps = {i: next(o for o in jobs[i]["overrides"] if o.startswith("sleep_s=")) for i in jobs}
    assert sleeps == {0: "sleep_s=5", 1: "sleep_s=0.1", 2: "sleep_s=5"}
    submitted = {int(i): r["t"] for r in records if r["kind"] == "submitted" for i in r["job_ids"]}
    finished = {i: json.loads((sweep / str(i) / "status.json").read_text())["finished"]
                for i in range(3)}  # fmt: skip
    # The job's own end (status.json) to the next submission: one poll, plus the ask, the
    # composition and the submission on a busy 2-core machine.
    assert submitted[2] - finished[1] <= POLL_S + 1.5, (submitted, finished)
    assert finished[0] > submitted[2] + 2.0, "the long trial should still have been running"
    trials = study_of(sweep, APP_STUDY).trials
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["n_trials"] == 3 and best["best_value"] == min(t.value for t in trials)


def test_a_diverging_trial_fails_and_the_study_completes(tmp_path):
    result = run_local(
        tmp_path, "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=2",
        "optim.lr=choice(3e-3,1e6)", "steps=12", "logging.val_loss_every=6",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    sweep = tmp_path / "sweep"
    states = {t.params["optim.lr"]: t.state.name for t in study_of(sweep).trials}
    assert states == {0.003: "COMPLETE", 1e6: "FAIL"}
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"optim.lr": 0.003} and best["states"]["FAIL"] == 1
    rows = {r["optim.lr"]: r for r in results_rows(sweep)}
    assert rows["1000000.0"]["status"] == "FAILED" and "loss" in rows["1000000.0"]["error"]
    assert rows["0.003"]["best"] == "true" and rows["1000000.0"]["best"] == "false"


def test_a_killed_launcher_is_resumed_and_the_study_ends_at_n_trials(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["hydra.sweeper.n_trials=4", "sleep_s=2", "value=tag(log,interval(1e-4,1e-2))",
            "hydra.sweeper.sampler.seed=0"]  # fmt: skip
    proc = subprocess.Popen(app_cmd(sweep, *args), cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # one trial told, the third one registered
            kinds = [r["kind"] for r in journal_records(sweep)]
            if kinds.count("result") >= 1 and kinds.count("job") >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the sweep never got to its third trial")
    finally:
        proc.kill()  # SIGKILL: no cleanup at all; the local jobs run on
        proc.wait()
    result = subprocess.run(app_cmd(sweep, *args), cwd=tmp_path, env=env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = journal_records(sweep)
    assert any(r["kind"] == "resumed" for r in records)
    jobs = {r["index"]: r["trial"] for r in records if r["kind"] == "job"}
    assert jobs == {0: 0, 1: 1, 2: 2, 3: 3}  # n_trials in all, one job each
    submissions = [i for r in records if r["kind"] == "submitted" for i in r["job_ids"]]
    assert sorted(submissions) == ["0", "1", "2", "3"]  # nothing ran twice
    trials = study_of(sweep, APP_STUDY).trials
    assert len(trials) == 4 and {t.state.name for t in trials} == {"COMPLETE"}


def test_ctrl_c_stops_trials_without_failing_them_and_a_resume_reruns_their_params(tmp_path):
    """Ctrl-C at trials 0 and 1: their jobs are cancelled, the study marks them stopped (not
    failures, not counted), and the resumed search runs their parameters again and ends with
    n_trials finished trials, none failed."""
    sweep = tmp_path / "sweep"
    args = ["hydra.sweeper.n_trials=3", "steps=400", "logging.val_loss_every=200",
            "optim.lr=tag(log,interval(1e-4,1e-2))", "hydra.sweeper.sampler.seed=0",
            "hydra.sweeper.max_failure_rate=0.0"]  # fmt: skip
    proc = subprocess.Popen(local_cmd(sweep, *args), cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if sum(r.get("state") == "RUNNING" for r in journal_records(sweep)) >= 2:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    results = {r["index"]: r["status"] for r in journal_records(sweep) if r["kind"] == "result"}
    assert results == {0: "CANCELLED", 1: "CANCELLED"}  # and no third trial was asked
    trials = study_of(sweep).trials
    assert [(t.state.name, t.user_attrs.get("stopped")) for t in trials[:2]] == [
        ("FAIL", True), ("FAIL", True)]  # fmt: skip
    stopped_params = [t.params for t in trials[:2]]

    result = run_local(tmp_path, *args)  # max_failure_rate=0: one failure would stop it
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study_of(sweep).trials
    counted = [t for t in trials if t.user_attrs.get("stopped") is not True]
    assert [t.state.name for t in counted] == ["COMPLETE"] * 3
    reruns = {t.user_attrs["retry_of"]: t.params for t in counted if "retry_of" in t.user_attrs}
    assert reruns == {0: stopped_params[0], 1: stopped_params[1]}
    assert "alembic" not in result.stderr and "A new study created" not in result.stderr


def test_a_trial_asked_but_never_recorded_runs_with_its_params(tmp_path):
    # What a launcher killed between `study.ask()` and the journal's record leaves behind.
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    study = optuna.create_study(study_name=APP_STUDY, storage=f"sqlite:///{sweep / 'optuna.db'}")
    study.enqueue_trial({"value": 0.00123})
    trial = study.ask()
    trial.set_user_attr("sweep_dir", str(sweep.resolve()))  # this sweep asked for it
    trial.suggest_float("value", 1e-4, 1e-2, log=True)
    study.ask()  # killed between ask() and its sweep attribute: in the sweep's own study
    result = subprocess.run(
        app_cmd(sweep, "hydra.sweeper.n_trials=3", "value=tag(log,interval(1e-4,1e-2))"),
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {r["index"]: r for r in journal_records(sweep) if r["kind"] == "job"}
    assert sorted(jobs[i]["trial"] for i in jobs) == [0, 1, 2]  # both adopted, one more asked
    assert "value=0.00123" in next(j for j in jobs.values() if j["trial"] == 0)["overrides"]
    states = [t.state.name for t in study_of(sweep, APP_STUDY).trials]
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE"]  # none left RUNNING for good


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.scheduler=choice(cosine,nope)"], "optim.scheduler='nope' is not registered"),
        (["hydra/sweeper/pruner=median", "hydra.sweeper.direction=[minimize,maximize]"],
         "cannot prune multi-objective"),
    ],
)  # fmt: skip
def test_a_mistake_is_one_line_and_runs_nothing(tmp_path, args, message):
    result = run_local(tmp_path, "steps=12", *args, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not any(r["kind"] == "job" for r in journal_records(tmp_path / "sweep"))


def test_another_launcher_is_one_line_naming_multicluster(tmp_path):
    cmd = [sys.executable, str(REPO / "train.py"), "-m", *BASE, "steps=12", "logging.wandb=null",
           "hydra/sweeper=async_optuna", "optim.lr=tag(log,interval(1e-4,1e-2))",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "hydra/launcher=multicluster" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "sweep" / "0").exists()


@pytest.mark.slurm
def test_a_pruner_stops_every_trial_early_on_both_clusters(tmp_path, testbed):
    # A threshold no loss is under: every trial is pruned at its first loss/val report.
    # A name of its own: the jobs' dirs on beta are <output root>/debug/multirun/<this name>.
    sweep = tmp_path / f"prune-{uuid.uuid4().hex[:8]}"
    cmd = sweep_cmd(
        testbed, sweep, "hydra/sweeper=async_optuna", "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=4", "hydra/sweeper/pruner=threshold",
        "hydra.sweeper.pruner.upper=0.0", "optim.lr=tag(log,interval(1e-4,1e-2))",
        "steps=3000", "logging.val_loss_every=6", "hydra.launcher.clusters=[alpha,beta]",
        one_job_per_node(testbed), "hydra.launcher.poll_interval_s=0.5",
        "hydra.launcher.timeout_min=5",
    )  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study_of(sweep).trials
    assert len(trials) == 4 and {t.state.name for t in trials} == {"PRUNED"}
    records = journal_records(sweep)
    pruned = {r["index"]: r["step"] for r in records if r["kind"] == "result"}
    assert set(pruned) == {0, 1, 2, 3} and all(6 <= s < 3000 for s in pruned.values()), pruned
    assert all(r["status"] == "PRUNED" for r in records if r["kind"] == "result")
    clusters = {r["cluster"] for r in records if r["kind"] == "submitted"}
    assert clusters == {"alpha", "beta"}, result.stderr[-3000:]
    prefix = f"debug.{records[0]['id']}."
    for cluster in clusters:  # scancelled, not run to the end
        assert set(sacct_jobs(testbed, cluster, prefix, at_least=1).values()) == {"CANCELLED"}
    rows = results_rows(sweep)
    assert {r["status"] for r in rows} == {"PRUNED"} and not any(r["best"] == "true" for r in rows)
    assert {int(r["step"]) for r in rows} == set(pruned.values())
    # The metrics of the jobs on beta came back with the prune: their curve up to the step.
    for index, step in pruned.items():
        lines = (sweep / str(index) / "metrics.jsonl").read_text().splitlines()
        assert any(json.loads(line).get("step") == step for line in lines)
