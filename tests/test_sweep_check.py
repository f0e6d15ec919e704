"""`lingua-sweep check`: each invariant broken and kept, on journals written by hand and Slurm
answers made up; then once on the testbed, a real sweep and a real orphan."""

import json
import subprocess
import sys

import pytest
from sweep_helpers import LINGUA_SWEEP, REPO, clean_env, journal_records, slurm

from lingua_sweep import cli
from lingua_sweep.sweep import check as check_lib
from lingua_sweep.sweep import remote
from lingua_sweep.sweep.journal import Journal

ID, NAME = "abcd1234", "app"
PREFIX = f"{NAME}.{ID}."
ALPHA = {"name": "alpha", "login": None, "ssh_options": [], "env": {"SLURM_CONF": "/a.conf"},
         "slurm": True}  # fmt: skip
ALPHA_GPU = {**ALPHA, "name": "alpha-gpu"}  # another partition of the same Slurm
BETA = {"name": "beta", "login": "beta-hn", "ssh_options": ["-F", "cfg"], "env": {},
        "slurm": True}  # fmt: skip
LOCAL = {"name": "local", "login": None, "ssh_options": [], "env": {}, "slurm": False}


class FakeSlurm:
    """Slurm's answers, per cluster: {cluster: ["id|name|state", ...]} for sacct and squeue."""

    def __init__(self, sacct=None, squeue=None, down=()):
        self.sacct, self.squeue, self.down = sacct or {}, squeue or {}, set(down)
        self.calls: list[tuple[str, str]] = []

    def __call__(self, cfg: dict, argv: list[str]) -> str:
        self.calls.append((cfg["name"], argv[0]))
        if cfg["name"] in self.down:
            reason = "exit 255: ssh: connection refused"
            raise remote.RemoteError(command=argv[0], login=cfg["login"], returncode=255,
                                     stderr="", reason=reason)  # fmt: skip
        lines = (self.sacct if argv[0] == "sacct" else self.squeue).get(cfg["name"], [])
        return "".join(line + "\n" for line in lines)


def new_sweep(tmp_path, jobs=2, clusters=(ALPHA, BETA, LOCAL), **header) -> Journal:
    journal = Journal(tmp_path / "sweep")
    configs = {c["name"]: c for c in clusters}
    journal.append("sweep", id=ID, name=NAME, sweep_dir=str(journal.dir), argv=[], cwd=".",
                   clusters=list(configs), cluster_configs=configs, params={},
                   **header)  # fmt: skip
    for i in range(jobs):
        journal.append("job", index=i, overrides=[f"x={i}"], config_hash=f"h{i}", trial=None)
    return journal


def submit(journal: Journal, cluster: str, ids: dict[int, str], n: int = 1) -> str:
    batch = f"{PREFIX}{n}"
    journal.append("intent", batch=batch, cluster=cluster, indices=list(ids), folder="f",
                   tasks=1, remote_dirs=None)  # fmt: skip
    journal.append("submitted", batch=batch, cluster=cluster, folder="f", tasks=1,
                   remote_dirs=None, job_ids={str(i): v for i, v in ids.items()})  # fmt: skip
    return batch


def finish(journal: Journal, index: int, status: str = "COMPLETED") -> None:
    journal.append("result", index=index, status=status, value=1.0, error=None, step=None)


def done_sweep(tmp_path, **header) -> Journal:
    """Two jobs, one array on alpha (ids 10_0 and 10_1), both COMPLETED."""
    journal = new_sweep(tmp_path, **header)
    submit(journal, "alpha", {0: "10_0", 1: "10_1"})
    finish(journal, 0)
    finish(journal, 1)
    return journal


def run(journal: Journal, fake: FakeSlurm, settle_s: float = 0.0) -> list[str]:
    return [str(v) for v in check_lib.check(journal.dir, settle_s=settle_s, run_slurm=fake)]


OK_ALPHA = [f"10_0|{PREFIX}1|COMPLETED", f"10_1|{PREFIX}1|COMPLETED"]


def test_a_clean_sweep_has_no_violation(tmp_path):
    fake = FakeSlurm(sacct={"alpha": [*OK_ALPHA, "3|someone.else.1|RUNNING"]})
    assert run(done_sweep(tmp_path), fake) == []
    # One sacct and one squeue per Slurm cluster; the local cluster is never asked.
    assert sorted(fake.calls) == [("alpha", "sacct"), ("alpha", "squeue"), ("beta", "sacct"),
                                  ("beta", "squeue")]  # fmt: skip


def test_violation_is_one_line():
    v = check_lib.Violation("I4", 3, "beta", "journal COMPLETED, sacct FAILED", "123")
    assert str(v) == "I4 job #3 on beta (job 123): journal COMPLETED, sacct FAILED"
    assert str(check_lib.Violation("I6", None, None, "x")) == "I6: x"


# --- I1: no orphan --------------------------------------------------------------------------


def test_i1_a_slurm_job_with_the_sweeps_name_the_journal_does_not_know(tmp_path):
    journal = done_sweep(tmp_path)
    # An array's tasks that never started are one sacct line (43_[1-2]): each is a job.
    fake = FakeSlurm(
        sacct={"alpha": [*OK_ALPHA, f"99|{PREFIX}7|CANCELLED by 0"],
               "beta": [f"43_[1-2%4]|{PREFIX}9|CANCELLED by 0"]},
        squeue={"beta": [f"42|{PREFIX}8|PENDING"]},
    )  # fmt: skip
    assert run(journal, fake) == [
        f"I1 on alpha (job 99): Slurm job {PREFIX}7 (CANCELLED by 0) is in no `submitted` or "
        "`stray` record",
        f"I1 on beta (job 42): Slurm job {PREFIX}8 (PENDING) is in no `submitted` or `stray` "
        "record",
        f"I1 on beta (job 43_1): Slurm job {PREFIX}9 (CANCELLED by 0) is in no `submitted` or "
        "`stray` record",
        f"I1 on beta (job 43_2): Slurm job {PREFIX}9 (CANCELLED by 0) is in no `submitted` or "
        "`stray` record",
        f"I2 on beta (job 42): {PREFIX}8 is PENDING in squeue; the launcher exited, the sweep is "
        "done",
    ]
    for job_id in ("43_1", "43_2"):
        journal.append("stray", cluster="beta", job_id=job_id, batch=f"{PREFIX}9", note="late")
    journal.append("stray", cluster="alpha", job_id="99", batch=f"{PREFIX}7", note="late sbatch")
    journal.append("stray", cluster="beta", job_id="42", batch=f"{PREFIX}8", note="late sbatch")
    fake.squeue = {}
    assert run(journal, fake) == []


def test_i1_an_unresolved_intent_is_known_only_while_the_launcher_runs(tmp_path):
    journal = new_sweep(tmp_path, jobs=1)
    journal.append("intent", batch=f"{PREFIX}1", cluster="beta", indices=[0], folder="f",
                   tasks=1, remote_dirs=None)  # fmt: skip
    fake = FakeSlurm(squeue={"beta": [f"5|{PREFIX}1|PENDING"]})
    launcher = Journal(journal.dir)
    launcher.lock()
    try:
        assert run(journal, fake) == []  # sbatch just returned: the launcher records it next
    finally:
        launcher.unlock()
    (line,) = run(journal, fake)
    assert line.startswith("I1 on beta (job 5): ") and "intent is unresolved" in line


# --- I2: nothing left in Slurm ----------------------------------------------------------------


def test_i2_a_job_still_queued_after_the_launcher_exited(tmp_path):
    journal = new_sweep(tmp_path, jobs=1)
    submit(journal, "beta", {0: "7"})
    journal.append("cancel", reason="cancelled by `lingua-sweep cancel`")
    fake = FakeSlurm(squeue={"beta": [f"7|{PREFIX}1|RUNNING"]})
    # The launcher is cancelling it right now: not yet a violation.
    launcher = Journal(journal.dir)
    launcher.lock()
    try:
        assert run(journal, fake) == []
    finally:
        launcher.unlock()
    assert run(journal, fake) == [
        f"I2 job #0 on beta (job 7): {PREFIX}1 is RUNNING in squeue; the launcher exited, the "
        "sweep is cancelled"
    ]
    # A sweep neither done nor cancelled (the launcher was killed): its jobs run on, rightly.
    journal = new_sweep(tmp_path / "other", jobs=1)
    submit(journal, "beta", {0: "7"})
    assert run(journal, fake) == []


def test_i2_a_job_squeue_still_shows_as_ended_is_not_active(tmp_path):
    fake = FakeSlurm(sacct={"alpha": OK_ALPHA}, squeue={"alpha": [f"10_0|{PREFIX}1|COMPLETED"]})
    assert run(done_sweep(tmp_path), fake) == []


# --- I3: one run per job --------------------------------------------------------------------


def test_i3_a_job_submitted_twice_without_a_move(tmp_path):
    journal = new_sweep(tmp_path, jobs=1)
    submit(journal, "alpha", {0: "11"}, n=1)
    journal.append("stop", index=0, cluster="alpha", job_id="11", status="MOVE", note="pending",
                   step=None, to="beta")  # fmt: skip
    journal.append("state", index=0, state="QUEUED", reason="lost")  # a bug would look like this
    submit(journal, "beta", {0: "12"}, n=2)
    finish(journal, 0)
    fake = FakeSlurm(sacct={"alpha": [f"11|{PREFIX}1|CANCELLED by 0"],
                            "beta": [f"12|{PREFIX}2|COMPLETED"]})  # fmt: skip
    assert run(journal, fake) == [
        "I3 job #0 on alpha (job 11): was submitted again, with no `moved` record for this one; "
        "a stop (MOVE) was asked, never confirmed"
    ]


def test_i3_a_moved_job_that_ran_anyway(tmp_path):
    journal = new_sweep(tmp_path, jobs=1)
    submit(journal, "alpha", {0: "11"}, n=1)
    journal.append("moved", index=0, cluster="alpha", job_id="11", to="beta", reason="pending")
    submit(journal, "beta", {0: "12"}, n=2)
    finish(journal, 0)
    fake = FakeSlurm(sacct={"alpha": [f"11|{PREFIX}1|CANCELLED by 0"],
                            "beta": [f"12|{PREFIX}2|COMPLETED"]})  # fmt: skip
    assert run(journal, fake) == []  # moved where it waited, ran once
    fake.sacct["alpha"] = [f"11|{PREFIX}1|FAILED"]
    assert run(journal, fake) == [
        "I3 job #0: ran to its end 2 times: alpha job 11 FAILED, beta job 12 COMPLETED"
    ]


def test_i3_a_stray_that_completed(tmp_path):
    journal = done_sweep(tmp_path)
    journal.append("stray", cluster="beta", job_id="50", batch=f"{PREFIX}3", note="late sbatch")
    fake = FakeSlurm(sacct={"alpha": OK_ALPHA, "beta": [f"50|{PREFIX}3|CANCELLED by 0"]})
    assert run(journal, fake) == []
    fake.sacct["beta"] = [f"50|{PREFIX}3|COMPLETED"]
    assert run(journal, fake) == [
        f"I3 on beta (job 50): stray {PREFIX}3 COMPLETED: it ran before it was cancelled"
    ]


def test_i3_a_submission_that_landed_for_a_finished_job_is_a_stray(tmp_path):
    journal = done_sweep(tmp_path)
    # A late sbatch of an intent already given up, found by its name after the job had ended.
    journal.append("submitted", batch=f"{PREFIX}2", cluster="alpha", folder="f", tasks=1,
                   remote_dirs=None, job_ids={"0": "60"})  # fmt: skip
    journal.append("stray", cluster="alpha", job_id="60", batch=f"{PREFIX}2", note="late")
    fake = FakeSlurm(sacct={"alpha": [*OK_ALPHA, f"60|{PREFIX}2|CANCELLED by 0"]})
    assert run(journal, fake) == []  # job #0's own run is still 10_0, COMPLETED
    fake.sacct["alpha"][-1] = f"60|{PREFIX}2|COMPLETED"
    assert run(journal, fake) == [
        f"I3 on alpha (job 60): stray {PREFIX}2 COMPLETED: it ran before it was cancelled"
    ]


# --- I4: the journal's final states are sacct's -----------------------------------------------


def test_i4_final_states_against_sacct(tmp_path):
    journal = new_sweep(tmp_path, jobs=5)
    submit(journal, "alpha", {0: "20_0", 1: "20_1", 2: "20_2"}, n=1)
    submit(journal, "beta", {3: "21"}, n=2)
    submit(journal, "local", {4: "4242"}, n=3)  # a process here: no sacct
    for index, status in enumerate(["COMPLETED", "FAILED", "PRUNED", "CANCELLED", "COMPLETED"]):
        finish(journal, index, status)
    fake = FakeSlurm(sacct={
        "alpha": [f"20_0|{PREFIX}1|COMPLETED", f"20_1|{PREFIX}1|TIMEOUT",
                  f"20_2|{PREFIX}1|CANCELLED by 1000"],
        "beta": [f"21|{PREFIX}2|CANCELLED by 0"],
    })  # fmt: skip
    assert run(journal, fake) == []
    fake.sacct["alpha"][0] = f"20_0|{PREFIX}1|FAILED"
    fake.sacct["beta"] = []
    assert run(journal, fake) == [
        "I4 job #0 on alpha (job 20_0): journal COMPLETED, sacct FAILED",
        "I4 job #3 on beta (job 21): journal CANCELLED, sacct has no record after 0s",
    ]


def test_i4_waits_for_sacct_to_catch_up(tmp_path):
    journal = done_sweep(tmp_path)
    answers = [[f"10_0|{PREFIX}1|COMPLETED", f"10_1|{PREFIX}1|RUNNING"], OK_ALPHA]

    def lagging_slurm(cfg, argv):
        if cfg["name"] == "alpha" and argv[0] == "sacct":
            return "".join(line + "\n" for line in answers.pop(0))
        return ""

    assert [str(v) for v in check_lib.check(journal.dir, settle_s=10,
                                            run_slurm=lagging_slurm)] == []  # fmt: skip
    assert answers == []  # asked again once, and no more


# --- I5: each job's outputs are its own -----------------------------------------------------


def test_i5_status_and_overrides_of_another_job(tmp_path):
    journal = done_sweep(tmp_path)
    fake = FakeSlurm(sacct={"alpha": OK_ALPHA})
    for index in (0, 1):
        (journal.dir / str(index) / ".hydra").mkdir(parents=True)
        (journal.dir / str(index) / "status.json").write_text(
            json.dumps({"status": "COMPLETED", "job_id": f"10_{index}"})
        )
        (journal.dir / str(index) / ".hydra" / "overrides.yaml").write_text(
            f"- x={index}\n- cluster=alpha\n- hydra.launcher.nodes=1\n"
        )
    assert run(journal, fake) == []
    (journal.dir / "1" / "status.json").write_text(json.dumps({"job_id": "77"}))
    (journal.dir / "0" / ".hydra" / "overrides.yaml").write_text("- x=1\n")
    assert run(journal, fake) == [
        "I5 job #0: .hydra/overrides.yaml holds ['x=1'], the journal ['x=0']",
        "I5 job #1 on alpha (job 10_1): status.json was written by job 77, not the journal's "
        "last job",
    ]


def test_i5_an_empty_overrides_file_is_torn_only_for_a_job_that_failed(tmp_path):
    """Hydra writes .hydra/overrides.yaml as the job starts: on a full disk the file is created
    empty and the job fails. That is a torn write, not another job's outputs."""
    journal = new_sweep(tmp_path)
    submit(journal, "alpha", {0: "10_0", 1: "10_1"})
    finish(journal, 0, "FAILED")
    finish(journal, 1)
    for index in (0, 1):
        (journal.dir / str(index) / ".hydra").mkdir(parents=True)
        (journal.dir / str(index) / ".hydra" / "overrides.yaml").write_text("")
    fake = FakeSlurm(sacct={"alpha": [f"10_0|{PREFIX}1|FAILED", f"10_1|{PREFIX}1|COMPLETED"]})
    assert run(journal, fake) == ["I5 job #1: .hydra/overrides.yaml holds [], the journal ['x=1']"]


# --- I6: the Optuna study -------------------------------------------------------------------


def optuna_sweep(tmp_path, states: list[str], n_trials: int = 2, **trial_attrs) -> Journal:
    optuna = pytest.importorskip("optuna")
    journal = new_sweep(tmp_path, jobs=0, study={"name": "s", "directions": ["minimize"]})
    (journal.dir / "multirun.yaml").write_text(f"hydra:\n  sweeper:\n    n_trials: {n_trials}\n")
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{journal.dir / 'optuna.db'}")
    for i, state in enumerate(states):
        trial = study.ask()
        for key, value in trial_attrs.get(f"t{i}", {}).items():
            trial.set_user_attr(key, value)
        journal.append("job", index=i, overrides=[f"x={i}"], config_hash=f"h{i}", trial=i)
        if state == "RUNNING":
            continue
        study.tell(trial, 1.0 if state == "COMPLETE" else None,
                   state=optuna.trial.TrialState[state])  # fmt: skip
        finish(journal, i, {"COMPLETE": "COMPLETED", "PRUNED": "PRUNED"}.get(state, "FAILED"))
    return journal


def test_i6_the_study_holds_n_trials_finished_trials(tmp_path):
    assert run(optuna_sweep(tmp_path, ["COMPLETE", "PRUNED"]), FakeSlurm()) == []
    journal = optuna_sweep(tmp_path / "b", ["COMPLETE", "FAIL", "COMPLETE"],
                           t2={"stopped": True})  # fmt: skip
    assert run(journal, FakeSlurm()) == []  # a stopped trial does not count
    journal = optuna_sweep(tmp_path / "c", ["COMPLETE"])
    assert run(journal, FakeSlurm()) == ["I6: 1 finished trials in study 's', n_trials=2"]
    journal.append("cancel", reason="cancelled")
    assert run(journal, FakeSlurm()) == []  # cancelled: fewer trials is right


def test_i6_no_trial_running_once_the_launcher_exited(tmp_path):
    journal = optuna_sweep(tmp_path, ["COMPLETE", "RUNNING"])
    launcher = Journal(journal.dir)
    launcher.lock()
    try:
        assert run(journal, FakeSlurm()) == []  # in flight
    finally:
        launcher.unlock()
    assert run(journal, FakeSlurm()) == ["I6 job #1: trial 1 is RUNNING, but the launcher exited"]


# --- Slurms that do not answer, or are shared -----------------------------------------------


def test_a_cluster_that_does_not_answer_is_one_line_and_the_rest_is_checked(tmp_path):
    journal = done_sweep(tmp_path)
    submit(journal, "beta", {}, n=2)
    fake = FakeSlurm(sacct={"alpha": [*OK_ALPHA, f"98|{PREFIX}9|RUNNING"]}, down={"beta"})
    assert run(journal, fake) == [
        "UNREACHABLE on beta: exit 255: ssh: connection refused; I1-I4 not checked there",
        f"I1 on alpha (job 98): Slurm job {PREFIX}9 (RUNNING) is in no `submitted` or `stray` "
        "record",
    ]
    assert fake.calls.count(("beta", "sacct")) == 1


def test_two_partitions_of_one_slurm_are_asked_once(tmp_path):
    journal = new_sweep(tmp_path, jobs=2, clusters=(ALPHA, ALPHA_GPU))
    submit(journal, "alpha", {0: "30"}, n=1)
    submit(journal, "alpha-gpu", {1: "31"}, n=2)
    finish(journal, 0)
    finish(journal, 1, "FAILED")
    fake = FakeSlurm(sacct={"alpha": [f"30|{PREFIX}1|COMPLETED", f"31|{PREFIX}2|OUT_OF_MEMORY"]})
    report = check_lib.build_report(journal.dir, settle_s=0, run_slurm=fake)
    assert report.violations == []
    assert (report.jobs, report.slurm_jobs, report.clusters) == (2, 2, 2)
    assert fake.calls == [("alpha", "sacct"), ("alpha", "squeue")]


# --- the command ----------------------------------------------------------------------------


def test_the_command(tmp_path, monkeypatch, capsys):
    journal = done_sweep(tmp_path)
    fake = FakeSlurm(sacct={"alpha": OK_ALPHA})
    monkeypatch.setattr(check_lib, "default_run_slurm", fake)
    assert cli.main(["check", str(journal.dir), "--settle", "0"]) == 0
    assert capsys.readouterr().out == "ok: 2 jobs, 2 Slurm jobs on 2 clusters, no violation\n"

    fake.sacct["alpha"] = [*OK_ALPHA, f"99|{PREFIX}5|PENDING"]
    assert cli.main(["check", str(journal.dir), "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is False
    assert payload["violations"] == [{"code": "I1", "index": None, "cluster": "alpha",
                                      "message": payload["violations"][0]["message"],
                                      "job_id": "99"}]  # fmt: skip

    assert cli.main(["check", str(tmp_path / "nothing")]) == 2
    assert "has no sweep journal" in capsys.readouterr().err


# --- live, on the testbed -------------------------------------------------------------------

RANK_APP = REPO / "tests" / "apps" / "rank_app.py"


@pytest.mark.slurm
def test_a_real_sweep_checks_clean_then_an_orphan_is_reported(tmp_path, testbed):
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable, str(RANK_APP), "-m", "value=1,2", "hydra/launcher=multicluster",
        f"hydra.searchpath=[file://{testbed.conf_dir}]", "hydra.launcher.poll_interval_s=1",
        "hydra.launcher.probe_every_s=1", "hydra.launcher.live=false",
        "hydra.launcher.clusters=[alpha]", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    def check(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([LINGUA_SWEEP, "check", str(sweep_dir), *args], env=clean_env(),
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    ok = check()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout == "ok: 2 jobs, 2 Slurm jobs on 1 clusters, no violation\n"

    header = journal_records(sweep_dir)[0]
    orphan = slurm(testbed, "alpha", "sbatch", "--parsable", "-p", "batch", "-J",
                   f"{header['name']}.{header['id']}.999", "--output=/dev/null", "--wrap",
                   "sleep 300").strip().split(";")[0]  # fmt: skip
    try:
        bad = check("--settle", "0")
    finally:
        slurm(testbed, "alpha", "scancel", orphan, check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = bad.stdout.splitlines()
    assert any(line.startswith(f"I1 on alpha (job {orphan}): ") for line in lines), lines
    assert any(line.startswith(f"I2 on alpha (job {orphan}): ") for line in lines), lines
