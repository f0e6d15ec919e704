"""The live view: plain lines off a terminal, a table fitting 80 columns, progress from metrics."""

import io
import json
from types import SimpleNamespace

from rich.console import Console

from lingua_sweep.sweep import monitor
from lingua_sweep.sweep.journal import Journal


def make_sweep(tmp_path):
    journal = Journal(tmp_path)
    journal.append("sweep", id="s1", name="debug")
    for i, lr in enumerate(["0.00010979877869591871", "0.003"]):
        journal.append("job", index=i, overrides=["experiment=debug", f"optim.lr={lr}"],
                       config_hash=f"h{i}")  # fmt: skip
    journal.append("intent", batch="b", cluster="alpha", indices=[0, 1], folder="f", tasks=1)
    journal.append("submitted", batch="b", cluster="alpha", folder="f", tasks=1,
                   job_ids={"0": "41_0", "1": "41_1"})  # fmt: skip
    journal.append("state", index=0, state="RUNNING")
    journal.append("state", index=1, state="RUNNING")
    (tmp_path / "0").mkdir()
    lines = [{"step": 0, "loss/init": 5.5}, {"step": 40, "loss/out": 3.21}, '{"step": 4']
    (tmp_path / "0" / "metrics.jsonl").write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)  # torn last line
    )
    journal.append("result", index=1, status="FAILED", error="UserError: loss is nan at step 3")
    return journal


def controller_for(tmp_path, journal):
    return SimpleNamespace(state=journal.replay(), sweep_dir=tmp_path, tails={},
                           totals={0: 100}, links={})  # fmt: skip


def test_rows_show_progress_and_only_what_varies(tmp_path):
    journal = make_sweep(tmp_path)
    rows = monitor.job_rows(journal.replay(), tmp_path, {}, {0: 100})
    assert [(r.index, r.state, r.job_id, r.step, r.total, r.loss) for r in rows] == [
        (0, "RUNNING", "41_0", 40, 100, 3.21), (1, "FAILED", "41_1", None, None, None),
    ]  # fmt: skip
    assert rows[0].params == "optim.lr=0.00011"  # 3 significant digits; experiment=debug is shared
    assert rows[1].note == "UserError: loss is nan at step 3"
    assert monitor.totals_line(rows) == "1/2 done (1 failed, 1 running)"


def test_the_table_fits_80_columns_without_cutting_state_or_loss(tmp_path):
    journal = make_sweep(tmp_path)
    rows = monitor.job_rows(journal.replay(), tmp_path, {}, {0: 100})
    out = io.StringIO()
    Console(file=out, width=80).print(monitor.render(rows, title="t"))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "RUNNING" in text and "FAILED" in text and "3.21" in text and "40/100" in text
    assert "…" not in text


def test_plain_mode_prints_state_changes_and_a_totals_line(tmp_path):
    journal = make_sweep(tmp_path)
    out = io.StringIO()
    view = monitor.Monitor(live=False, stream=out)
    view.update(controller_for(tmp_path, journal))
    first = out.getvalue().splitlines()
    assert first[0] == "#0 RUNNING on alpha (job 41_0) optim.lr=0.00011"
    assert first[1].startswith("#1 FAILED on alpha (job 41_1) optim.lr=0.003: UserError: loss")
    assert len(first) == 2  # no QUEUED lines before, and totals only every PLAIN_EVERY_S
    view._last_plain -= monitor.PLAIN_EVERY_S
    view.update(controller_for(tmp_path, journal))
    first = out.getvalue().splitlines()
    assert first[2] == "[sweep] 1/2 done (1 failed, 1 running); #0 40/100 loss 3.21"
    view.update(controller_for(tmp_path, journal))  # nothing changed, totals not due: silent
    assert out.getvalue().splitlines() == first
    view.summary(controller_for(tmp_path, journal))
    assert f"lingua-sweep results {tmp_path}" in out.getvalue()


def test_the_summary_is_the_results_table_with_the_best_and_how_to_run_it_again(tmp_path):
    """The same facts as `lingua-sweep results` (final metrics, not a poll's cache), the best
    marked, and its command line."""
    journal = Journal(tmp_path)
    journal.append("sweep", id="s1", name="debug", argv=["/venv/python", "train.py", "-m"])
    for i, (lr, val) in enumerate([("0.001", 3.25), ("0.0031622776601683794", 2.75)]):
        journal.append("job", index=i, overrides=["cluster=alpha", "experiment=debug",
                       f"optim.lr={lr}"], config_hash=f"h{i}")  # fmt: skip
        journal.append("result", index=i, status="COMPLETED", value=val)
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.jsonl").write_text(
            json.dumps({"step": 10, "loss/train": val + 1, "loss/val": val}) + "\n"
        )
    out = io.StringIO()
    view = monitor.Monitor(live=False, stream=out)
    view.summary(controller_for(tmp_path, journal))
    text = out.getvalue()
    best_line = next(line for line in text.splitlines() if "★" in line)
    assert "0.00316" in best_line and "2.75" in best_line  # 3 significant digits
    assert "best: #1 val loss 2.75; to run it again alone:" in text
    assert "  python train.py experiment=debug optim.lr=0.0031622776601683794\n" in text
