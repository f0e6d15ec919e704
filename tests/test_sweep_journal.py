"""The sweep journal: replay, torn lines, one controller per sweep."""

import json
import subprocess
import sys
import time

import pytest

from lingua_sweep.errors import UserError
from lingua_sweep.sweep.journal import QUEUED, SUBMITTING, Journal, apply, replay


def _jobs(journal: Journal, n: int = 2) -> None:
    journal.append("sweep", id="abc", argv=["train.py"])
    for i in range(n):
        journal.append("job", index=i, overrides=[f"optim.lr={i}"], config_hash=f"h{i}")


def test_replay_follows_a_job_from_queue_to_result(tmp_path):
    journal = Journal(tmp_path)
    _jobs(journal)
    journal.append("intent", batch="b1", cluster="alpha", indices=[0, 1], folder="f", tasks=2)
    state = journal.replay()
    assert [j.state for j in state.jobs.values()] == [SUBMITTING, SUBMITTING]
    assert list(state.intents) == ["b1"]
    journal.append("submitted", batch="b1", cluster="alpha", folder="f", tasks=2,
                   job_ids={"0": "7_0", "1": "7_1"})  # fmt: skip
    journal.append("state", index=0, state="RUNNING")
    journal.append("result", index=0, status="COMPLETED", value=2.5)
    journal.append("result", index=0, status="FAILED", error="late poll")  # first word stands
    state = journal.replay()
    assert not state.intents
    job0, job1 = state.jobs[0], state.jobs[1]
    assert (job0.state, job0.job_id, job0.tasks, job0.result["value"]) == (
        "COMPLETED",
        "7_0",
        2,
        2.5,
    )
    assert [h[1] for h in job0.history] == [QUEUED, SUBMITTING, "PENDING", "RUNNING", "COMPLETED"]
    assert (job1.state, job1.job_id) == ("PENDING", "7_1")


def test_an_unsubmitted_intent_puts_its_jobs_back_in_the_queue(tmp_path):
    journal = Journal(tmp_path)
    _jobs(journal)
    journal.append("intent", batch="b1", cluster="beta", indices=[0, 1], folder="f", tasks=1)
    journal.append("unsubmitted", batch="b1", indices=[0, 1], reason="ssh: refused")
    state = journal.replay()
    assert [(j.state, j.cluster) for j in state.jobs.values()] == [(QUEUED, None)] * 2
    assert not state.intents


def test_a_moved_job_is_queued_again_and_counts_its_move(tmp_path):
    journal = Journal(tmp_path)
    _jobs(journal, 1)
    journal.append("intent", batch="b", cluster="alpha", indices=[0], folder="f", tasks=1)
    journal.append("submitted", batch="b", cluster="alpha", folder="f", tasks=1, job_ids={"0": "5"})
    journal.append("moved", index=0, cluster="alpha", job_id="5", to="beta", reason="pending")
    job = journal.replay().jobs[0]
    assert (job.state, job.cluster, job.job_id, job.moves) == (QUEUED, None, None, 1)


def test_a_torn_last_line_is_ignored_and_the_next_record_starts_fresh(tmp_path):
    journal = Journal(tmp_path)
    _jobs(journal, 1)
    with journal.path.open("a") as f:
        f.write('{"kind": "result", "index": 0, "status": "COMPL')  # killed mid-write
    assert journal.replay().jobs[0].state == QUEUED
    journal.append("state", index=0, state="RUNNING")
    lines = journal.path.read_text().splitlines()
    assert json.loads(lines[-1])["state"] == "RUNNING"
    assert journal.replay().jobs[0].state == "RUNNING"


def test_replay_is_the_same_from_the_file_and_from_memory(tmp_path):
    journal = Journal(tmp_path)
    _jobs(journal, 3)
    journal.append("cancel", reason="user")
    assert replay(journal.records()) == journal.replay()
    assert journal.replay().cancel_requested


def test_one_controller_per_sweep_and_the_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; sys.path.insert(0, '.')\n"
            "from lingua_sweep.sweep.journal import Journal\n"
            f"Journal({str(tmp_path)!r}).lock(); print('locked', flush=True); time.sleep(60)"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid} on "):
            Journal(tmp_path).lock()
    finally:
        holder.kill()  # like kill -9: no cleanup runs
        holder.wait()
    time.sleep(0.1)
    journal = Journal(tmp_path)
    journal.lock()  # the dead holder's lock is gone
    journal.unlock()


def test_a_second_writer_is_noticed(tmp_path):
    ours, theirs = Journal(tmp_path), Journal(tmp_path)
    _jobs(ours, 1)
    ours.replay()
    assert not ours.changed_by_others()
    ours.append("state", index=0, state="RUNNING")
    assert not ours.changed_by_others()
    theirs.append("cancel", reason="from another machine")
    assert ours.changed_by_others()
    assert ours.replay().cancel_requested and not ours.changed_by_others()


def _submitted(journal: Journal, index: int, job_id: str, batch: str = "b") -> None:
    journal.append("intent", batch=batch, cluster="alpha", indices=[index], folder="f", tasks=1)
    journal.append("submitted", batch=batch, cluster="alpha", folder="f", tasks=1,
                   job_ids={str(index): job_id})  # fmt: skip


def test_a_stop_is_not_an_end_until_slurm_confirms_it(tmp_path):
    journal = Journal(tmp_path)
    _jobs(journal, 1)
    _submitted(journal, 0, "5")
    journal.append("stop", index=0, cluster="alpha", job_id="5", status="PRUNED", note="p", step=4)
    job = journal.replay().jobs[0]
    assert not job.final and job.stopping == {
        "status": "PRUNED",
        "note": "p",
        "step": 4,
        "to": None,
    }
    journal.append("result", index=0, status="PRUNED", error="p", step=4)
    job = journal.replay().jobs[0]
    assert job.final and job.stopping is None


def test_a_moved_job_is_bound_to_where_it_was_moved(tmp_path):
    journal = Journal(tmp_path)
    _jobs(journal, 1)
    _submitted(journal, 0, "5")
    journal.append("stop", index=0, cluster="alpha", job_id="5", status="MOVE", note="n", to="beta")
    journal.append("moved", index=0, cluster="alpha", job_id="5", to="beta", reason="pending")
    job = journal.replay().jobs[0]
    assert (job.state, job.target, job.stopping) == (QUEUED, "beta", None)


def test_a_late_submission_never_reopens_a_final_job_it_is_a_stray(tmp_path):
    """A cancel ended the job while its sbatch was in flight; the ids arrive afterwards."""
    journal = Journal(tmp_path)
    _jobs(journal, 1)
    journal.append("intent", batch="b", cluster="alpha", indices=[0], folder="f", tasks=1)
    journal.append("result", index=0, status="CANCELLED", error="Ctrl-C")
    journal.append("submitted", batch="b", cluster="alpha", folder="f", tasks=1,
                   job_ids={"0": "9"})  # fmt: skip
    state = journal.replay()
    assert state.jobs[0].state == "CANCELLED" and state.jobs[0].job_id is None
    assert state.strays == {("alpha", "9"): "b"} and state.known_ids == {("alpha", "9"): None}
    journal.append("stray", cluster="alpha", job_id="9", batch="b", note="cancelled")
    assert journal.replay().strays == {}


@pytest.mark.parametrize(
    "ids, expected",
    [
        (["7_0", "7_1", "7_2"], {"3": "7_0", "4": "7_1", "5": "7_2"}),
        (["7_0", "7_2"], {"3": "7_0", "5": "7_2"}),  # 7_1 not visible yet: #4 gets nothing
        (["7_2"], {"5": "7_2"}),
        (["8"], {}),  # a plain id names no task of a three-job batch
        (["7_9"], {}),
    ],
)
def test_ids_go_to_jobs_by_array_task_never_by_position(ids, expected):
    from lingua_sweep.sweep.submit import ids_by_index

    assert ids_by_index([3, 4, 5], ids) == expected
    assert ids_by_index([3], ["8"]) == {"3": "8"}


def test_a_short_write_on_a_full_disk_is_an_error_and_leaves_no_record(tmp_path):
    """ENOSPC after part of a record: the launcher hears it; replay skips the torn part, and
    the next record (once there is room) starts on a line of its own."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    from faults.injectors import full_disk

    sweep = tmp_path / "sweep"
    with full_disk(sweep, size_kb=64, free_kb=4, keep=True):
        journal = Journal(sweep)
        _jobs(journal, 1)
        with pytest.raises(UserError, match="no space left on device"):
            journal.append("note", text="x" * 10_000)  # 4 KB fit, the rest does not
    journal = Journal(sweep)
    assert [r["kind"] for r in journal.records()] == ["sweep", "job"]
    journal.append("note", text="after")
    assert [r["kind"] for r in journal.records()] == ["sweep", "job", "note"]


def test_the_state_indexes_agree_with_the_jobs_after_every_record(tmp_path):
    """`active`, `by_state` and `touched` keep a cycle's work O(active jobs): they must say what
    a scan of every job would, after any record, including ones for a job that moved on."""
    import random

    rng = random.Random(3)
    journal = Journal(tmp_path)
    journal.append("sweep", id="s", name="n")
    records = [("job", {"index": i, "overrides": [f"x={i}"], "config_hash": "h"}) for i in range(8)]
    records.append(("intent", {"batch": "b1", "cluster": "a", "indices": [0, 1, 2, 3]}))
    records.append(
        (
            "submitted",
            {
                "batch": "b1",
                "cluster": "a",
                "folder": "f",
                "tasks": 1,
                "job_ids": {"0": "1_0", "1": "1_1", "2": "1_2", "3": "1_3"},
            },
        )
    )
    records += [("state", {"index": i, "state": rng.choice(["RUNNING", "PENDING"])})
                for i in range(4)]  # fmt: skip
    records.append(("result", {"index": 0, "status": "COMPLETED"}))
    records.append(("moved", {"index": 1, "to": "b", "reason": "pending"}))
    records.append(("resubmit", {"index": 2, "to": "a", "reason": "preempted"}))
    records.append(("unsubmitted", {"batch": "b0", "indices": [5], "reason": "x"}))
    records.append(("result", {"index": 0, "status": "FAILED"}))  # a late word: ignored
    records.append(("result", {"index": 7, "status": "CANCELLED"}))
    state = journal.replay()
    for kind, fields in records:
        apply(state, journal.append(kind, **fields))
        for name in {j.state for j in state.jobs.values()} | set(state.by_state):
            want = {i for i, j in state.jobs.items() if j.state == name}
            assert state.by_state.get(name, set()) == want, (kind, name)
        assert state.active == {i for i, j in state.jobs.items() if not j.final}, kind
    assert state.take_touched() == set(range(8)) and state.touched == set()
    assert journal.replay().by_state == state.by_state
