"""What the launcher reads from Slurm: durations as Slurm prints them, and how much of their
time limits other users' jobs used (sacct), from text and from the real testbed."""

import os
import subprocess
import sys
import time

import pytest

from lingua_sweep.sweep import slurm_queries as sq
from lingua_sweep.sweep.backends import answer

slurm = pytest.mark.slurm


def test_durations_read_as_slurm_prints_them():
    assert sq.slurm_duration("1-02:03:04") == 93784
    assert sq.slurm_duration("00:10:00") == 600
    assert sq.slurm_duration("05:30") == 330
    for no_limit in ("UNLIMITED", "Partition_Limit", "", "INVALID"):
        assert sq.slurm_duration(no_limit) is None


def test_others_time_used_is_the_median_share_of_their_limits_without_ours():
    rows = "\n".join([
        "bob|00:10:00|00:30:00",  # a third
        "bob|00:20:00|01:00:00",  # a third
        "amy|01:00:05|01:00:00",  # ran into its limit (and the 30 s enforcement): all of it
        "amy|00:00:00|01:00:00",  # cancelled while pending: says nothing
        "eve|00:05:00|UNLIMITED",  # no limit: says nothing
        "me|00:01:00|10:00:00",  # ours: Slurm's lateness is about the others
    ])  # fmt: skip
    assert sq.parse_time_used(rows, "me") == pytest.approx(1 / 3)
    assert sq.parse_time_used(rows + "\nbob|00:01:00|01:00:00", "me") == pytest.approx(1 / 3)
    assert sq.parse_time_used("bob|00:10:00|00:30:00\namy|00:10:00|00:20:00", "me") is None


@slurm
def test_others_time_used_from_the_testbeds_sacct(slurm_testbed, monkeypatch):
    """Three jobs that use a tenth of their one-minute limit, then sacct as the launcher asks
    it. The testbed's jobs are all this user's: to the user they are none of the others'."""
    env = slurm_testbed.env_alpha()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ids = []
    for _ in range(3):
        out = subprocess.run(["sbatch", "--parsable", "-p", "batch", "--time=1",
                              "--output=/dev/null", "--wrap", "sleep 6"], env=env,
                             capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
        ids.append(out.stdout.strip().split(";")[0])
    deadline = time.monotonic() + 90
    mine = ["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "--format=User,Elapsed,Timelimit"]
    while time.monotonic() < deadline:  # until slurmdbd has them ended
        state = ["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "State"]
        out = subprocess.run(state, env=env, capture_output=True, text=True, timeout=30)
        if out.stdout.split() == ["COMPLETED"] * 3:
            break
        time.sleep(1)
    else:
        pytest.fail(f"sacct never showed {ids} COMPLETED")
    # Slurm's own words for these three: 6-7 s of a one-minute limit each.
    rows = subprocess.run(mine, env=env, capture_output=True, text=True, timeout=30).stdout
    assert sq.parse_time_used(rows, "someone-else") == pytest.approx(0.11, abs=0.03), rows
    # The launcher's query over the partition's last days (the suite's other jobs too).
    used = sq.others_time_used("batch", me="someone-else")
    assert used is not None and 0 < used <= 1.0
    assert sq.others_time_used("batch") is None  # every job there is this user's own
    # The same through the agent the launcher runs on a cluster's login node.
    agent = subprocess.run([sys.executable, "-m", "lingua_sweep.sweep.agent", "time-used",
                            "--partition", "batch"], env={**os.environ, **env},
                           capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert answer(agent.stdout, "agent time-used") == {"time_used": None}


def test_reservations_read_as_scontrol_prints_them(monkeypatch):
    assert sq.expand_hostlist("alpha[1-3,05],beta7") == ["alpha1", "alpha2", "alpha3", "alpha05",
                                                         "beta7"]  # fmt: skip
    assert sq.expand_hostlist("n[01-02]x,a1") == ["n01x", "n02x", "a1"]
    now = sq.slurm_time("2026-12-03T06:00:00")
    out = (  # `scontrol show reservation -o`, as the testbed's Slurm 22.05 prints it
        "ReservationName=maint StartTime=2026-12-03T07:00:00 EndTime=2026-12-03T10:00:00 "
        "Duration=03:00:00 Nodes=alpha[1-2] NodeCnt=2 CoreCnt=16 Features=(null) "
        "PartitionName=(null) Flags=MAINT,SPEC_NODES TRES=cpu=16 Users=root Groups=(null) "
        "Accounts=(null) Licenses=(null) State=INACTIVE BurstBuffer=(null) Watts=n/a\n"
        "ReservationName=course StartTime=2026-12-03T05:00:00 EndTime=2026-12-03T06:30:00 "
        "Duration=01:30:00 Nodes=alpha3 NodeCnt=1 State=ACTIVE\n"
    )
    monkeypatch.setattr(sq, "run", lambda argv: out)
    # An hour's limit started now fits before maintenance (not a second later), not the
    # course, which is on now
    assert sq.reserved_nodes({"time": 60}, now=now) == {
        "alpha1": [now, now + 4 * 3600], "alpha2": [now, now + 4 * 3600],
        "alpha3": [now - 2 * 3600, now + 1800]}  # fmt: skip
    # Two hours' does not: kept off until maintenance ends
    assert sq.reserved_nodes({"time": 120}, now=now)["alpha1"] == [now - 3600, now + 4 * 3600]
    # Two reservations that meet are one window; the next one apart is not yet read
    assert sq.kept_nodes([(10, 20, ["a"]), (20, 30, ["a"]), (90, 99, ["a"])], now=0,
                         limit_s=5) == {"a": [5, 30]}  # fmt: skip
    assert sq.kept_nodes([(10, 20, ["a"]), (90, 99, ["a"])], now=25, limit_s=5) == {
        "a": [85, 99]}  # fmt: skip
    monkeypatch.setattr(sq, "run", lambda argv: "No reservations in the system\n")
    assert sq.reserved_nodes({"time": 60}) == {}


def test_an_array_task_that_started_is_never_read_from_its_arrays_bare_line(tmp_path, monkeypatch):
    from lingua_sweep.sweep import agent, job

    sacct = {"out": ""}

    def run(argv):  # squeue: nothing active; sacct: as set below
        return sacct["out"] if argv[0] == "sacct" else ""

    monkeypatch.setattr(sq, "run", run)
    ids = ["5801_0", "5801_1"]
    dirs = {i: tmp_path / i for i in ids}
    request = {"jobs": [{"id": i, "folder": str(tmp_path), "tasks": 1, "dir": str(dirs[i])}
                        for i in ids]}  # fmt: skip
    # An array cancelled before any task started: slurmdbd's line for it, under its bare base
    # id until it knows the record's tasks (seconds; under load more than 30), is every task's.
    sacct["out"] = "5801|CANCELLED by 0|0:0\n"
    assert {i: s["state"] for i, s in agent.poll(request, slurm=True)["states"].items()} == {
        "5801_0": "CANCELLED", "5801_1": "CANCELLED"}  # fmt: skip
    # The same line a moment after the pending task 1 was cancelled while task 0, split off,
    # ran and completed (its status.json says it started): task 0's own record is not in yet
    # (the CI flake: task 0 was recorded CANCELLED). Task 0 is unknown until it is.
    dirs["5801_0"].mkdir()
    job.write_status(dirs["5801_0"], status="COMPLETED", job_id="5801_0")
    reply = agent.poll(request, slurm=True)
    assert reply["states"]["5801_0"] == {"state": "UNKNOWN", "ran": True}
    assert reply["states"]["5801_1"]["state"] == "CANCELLED" and "5801_0" not in reply["outcomes"]
    # Seconds later each has its own line
    sacct["out"] = "5801_0|COMPLETED|0:0\n5801_1|CANCELLED by 0|0:0\n"
    states = sq.slurm_states(ids)[0]
    assert [states[i]["state"] for i in ids] == ["COMPLETED", "CANCELLED"]
    # A task's own line wins over its array's range line, in whichever order sacct prints them.
    for out in ("5801_[0-1]|CANCELLED|0:0\n5801_0|COMPLETED|0:0\n",
                "5801_0|COMPLETED|0:0\n5801_[0-1]|CANCELLED|0:0\n"):  # fmt: skip
        sacct["out"] = out
        states = sq.slurm_states(ids)[0]
        assert [states[i]["state"] for i in ids] == ["COMPLETED", "CANCELLED"]
