"""`lingua-sweep ls` finds sweeps newest first with their best; `logs` reads a job's log where
it ran, from an offset, following it until the job ends."""

import io
import json
import threading
import time

import pytest

from lingua_sweep.errors import UserError
from lingua_sweep.sweep import finding
from lingua_sweep.sweep.journal import Journal

LOCAL = {"name": "local", "slurm": False, "data_root": "/d", "output_root": "/o"}


def sweep(root, name: str, values: list[float | None], t: float) -> Journal:
    journal = Journal(root)
    journal.append("sweep", id=name, name=name, cluster_configs={"local": LOCAL})
    records = journal.records()
    records[0]["t"] = t  # when it started, for the order
    journal.path.write_text(json.dumps(records[0]) + "\n")
    for i, value in enumerate(values):
        journal.append("job", index=i, overrides=["experiment=debug", f"optim.lr={i + 1}e-3"],
                       config_hash=f"h{i}")  # fmt: skip
        if value is not None:
            journal.append("result", index=i, status="COMPLETED", value=value)
    return journal


def test_ls_lists_sweeps_newest_first_with_their_best(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per sweep
    sweep(tmp_path / "multirun" / "2026-12-01" / "10-00-00", "old", [3.5, 3.0], t=1e9)
    sweep(tmp_path / "multirun" / "2026-12-02" / "09-00-00", "new", [2.5, None], t=2e9)
    out = io.StringIO()
    assert finding.list_sweeps([str(tmp_path / "multirun")], out=out) == 0
    lines = [line for line in out.getvalue().splitlines() if "multirun/" in line]
    assert "new" in lines[0] and "1/2" in lines[0] and "2.5 (#0 optim.lr=0.001)" in lines[0]
    assert "old" in lines[1] and "done" in lines[1] and "3 (#1 optim.lr=0.002)" in lines[1]
    with pytest.raises(UserError, match="no sweep"):
        finding.list_sweeps([str(tmp_path / "nothing")])


def test_logs_prints_the_tail_and_follows_until_the_job_ends(tmp_path):
    journal = sweep(tmp_path, "s", [], t=1e9)
    journal.append("job", index=0, overrides=["x=1"], config_hash="h")
    journal.append("intent", batch="b", cluster="local", indices=[0], folder="f", tasks=1)
    journal.append("submitted", batch="b", cluster="local", folder=str(tmp_path / "f"), tasks=1,
                   job_ids={"0": "4242"})  # fmt: skip
    log = tmp_path / "0" / "train.log"
    log.parent.mkdir()
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    out = io.StringIO()
    finding.job_logs(str(tmp_path), 0, follow=False, lines=3, out=out)
    assert out.getvalue() == "line 7\nline 8\nline 9\n"

    def later():  # read every 0.2 s below: line 10 is read well before the job ends
        time.sleep(0.3)
        with log.open("a") as f:
            f.write("line 10\n")
        time.sleep(1.2)
        journal.append("result", index=0, status="COMPLETED", value=1.0)

    out = io.StringIO()
    threading.Thread(target=later, daemon=True).start()
    finding.job_logs(str(tmp_path), 0, follow=True, lines=1, out=out, every_s=0.2)
    assert out.getvalue() == "line 9\nline 10\n"
    with pytest.raises(UserError, match="no job #5"):
        finding.job_logs(str(tmp_path), 5, follow=False)
