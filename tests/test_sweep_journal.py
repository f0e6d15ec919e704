"""The sweep journal: replay, torn lines, one controller per sweep."""

import json
import subprocess
import sys
import time

import pytest

from lingua_sweep.errors import UserError
from lingua_sweep.sweep.journal import QUEUED, SUBMITTING, Journal, replay


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
