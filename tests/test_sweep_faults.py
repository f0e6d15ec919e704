"""The fault campaign's fixed matrix: each fault as it happens in life, on the real testbed, at
the moment that used to break a sweep; after each, the sweep is resumed and every invariant of
`lingua-sweep check` holds (see tests/faults/campaign.py; bench/faults.py runs random ones).

The first three are the failures users met; the rest are the scenarios a code read found."""

import pytest
from faults.campaign import Scenario, run_scenario

MATRIX = [
    # A busy slurmctld: sbatch answers after the launcher's timeout (8 s), then lands.
    Scenario("slow sbatch on the ssh cluster", fault="slow_sbatch", seconds=20),
    # sbatch submits at once but its answer is late: the jobs exist before the launcher knows.
    Scenario(
        "slow sbatch answer on alpha", fault="slow_sbatch_after", seconds=14, clusters=("alpha",)
    ),  # fmt: skip
    # detach=true, then `lingua-sweep resume` must collect the results.
    Scenario("detach then resume", fault="detach", resume="cli", clusters=("alpha",)),
    # kill -9 of an async Optuna sweep over ssh, then `lingua-sweep resume`.
    Scenario(
        "async sweep killed after a submission, resumed",
        sweeper="async",
        clusters=("alpha", "beta"),
        interrupt="submit.landed:KILL",
        resume="cli",
        jobs=4,
    ),  # fmt: skip
    # kill -9 between Optuna's ask and anything recorded of the trial (its attribute, its job).
    Scenario(
        "async sweep killed between ask and its job",
        sweeper="async",
        clusters=("alpha",),
        interrupt="study.asked:KILL",
        jobs=4,
    ),  # fmt: skip
    # kill -9 right after a trial was told, before the next one is asked.
    Scenario(
        "async sweep killed after a tell",
        sweeper="async",
        clusters=("beta",),
        interrupt="study.told:KILL",
        resume="cli",
        jobs=4,
    ),  # fmt: skip
    # Ctrl-C right after a trial was told: the running one is stopped, not failed, and rerun.
    Scenario(
        "ctrl-c of an async sweep after a tell",
        sweeper="async",
        clusters=("alpha",),
        interrupt="study.told:INT",
        jobs=4,
    ),  # fmt: skip
    # Ctrl-C while an sbatch is still under way on the ssh cluster.
    Scenario(
        "ctrl-c during a slow submit",
        fault="slow_sbatch",
        seconds=15,
        interrupt="submit.sbatch:INT",
    ),  # fmt: skip
    # A login script prints after the agent's answer.
    Scenario("noise after the agent's answer", fault="noisy_agent"),
    # `lingua-sweep cancel` beside a running launcher, while scancel times out twice.
    Scenario(
        "cancel while scancel fails", fault="scancel_refused", at="running", clusters=("alpha",)
    ),  # fmt: skip
    Scenario(
        "resume=false beside a live launcher",
        fault="resume_false",
        at="running",
        clusters=("alpha",),
    ),  # fmt: skip
    Scenario(
        "full disk under the sweep dir", fault="full_disk", at="running", clusters=("alpha",)
    ),  # fmt: skip
    Scenario("kill -9 between a job's end and its result", interrupt="poll.final:KILL"),
    Scenario(
        "kill -9 between a stop and its scancel",
        fault="cancel_cli",
        at="running",
        interrupt="stop.recorded:KILL",
        clusters=("alpha",),
    ),  # fmt: skip
]


@pytest.mark.slurm
@pytest.mark.parametrize("scenario", MATRIX, ids=[s.name for s in MATRIX])
def test_fault_scenario_keeps_every_invariant(tmp_path, testbed, scenario):
    result = run_scenario(testbed, tmp_path, scenario)
    assert result.violations == [], (result.violations, result.launches)


@pytest.mark.slurm
def test_a_hung_cluster_never_stalls_the_other(tmp_path, testbed):
    """beta's login node hangs without a reset (sshd and its sessions SIGSTOPped) for 150 s,
    past every keepalive and call deadline, while both clusters have jobs: alpha's are polled,
    finish and are journaled during the hang, each within seconds of its end (not held until a
    hung call gives up); beta's after it, and the sweep completes."""
    import json

    from sweep_helpers import journal_records

    scenario = Scenario("ssh hung without a reset", fault="ssh_hung", at="submitted",
                        seconds=150, clusters=("alpha", "beta"), jobs=4, sleep_s=2)  # fmt: skip
    result = run_scenario(testbed, tmp_path, scenario)
    assert result.violations == [], (result.violations, result.launches)
    start, end = result.fault_window
    records = journal_records(tmp_path / "sweep")
    # Where each job was first sent: one whose sbatch went to beta as it froze is beta's (its
    # outcome is unknown until beta answers, so it may only go elsewhere after the hang).
    cluster_of = {}
    for r in records:
        if r["kind"] == "intent":
            for i in r["indices"]:
                cluster_of.setdefault(i, r["cluster"])
    ended = {r["index"]: r["t"] for r in records if r["kind"] == "result"}
    alpha = [i for i, c in cluster_of.items() if c == "alpha"]
    assert alpha and all(start < ended[i] < end for i in alpha), (start, end, ended, cluster_of)
    for i in alpha:  # at most a probe's timeout (10 s here) and a few polls, not the 150 s hang
        finished = json.loads((tmp_path / "sweep" / str(i) / "status.json").read_text())["finished"]
        assert ended[i] - finished < 30, (i, ended[i] - finished)
