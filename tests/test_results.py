"""`lingua-sweep results` on small sweep dirs written here the way Hydra, the trainer and the
multicluster launcher write them (no training, no Slurm)."""

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lingua_sweep import results, results_plot, results_table
from lingua_sweep.cli import main
from lingua_sweep.errors import UserError

SCRIPT = Path(sys.executable).parent / "lingua-sweep"
T0 = 1_700_000_000.0
STEPS = 100
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


# --- writing fake sweeps ---------------------------------------------------------------------


def loss_at(step: int, final: float) -> float:
    """A loss curve from 10 down to exactly `final` at step STEPS."""
    return final + (10.0 - final) * (1 - step / STEPS) ** 2


def metrics_records(last: int, final: float, *, t0: float = T0) -> list[dict]:
    """What the trainer logs: loss/init at 0, loss/out every 5 steps, loss/val every 10 steps
    (a separate log call, so a separate line with the same step)."""
    records = [{"step": 0, "time": t0, "loss/init": 10.6}]
    for step in range(5, last + 1, 5):
        records.append(
            {
                "step": step,
                "time": t0 + 2 * step,
                "loss/out": loss_at(step, final) + 0.02,
                "lr": 1e-3,
                "tokens_per_s": 1000.0 + step,
                "grad_norm": 0.5,
            }
        )
        if step % 10 == 0:
            records.append({"step": step, "time": t0 + 2 * step, "loss/val": loss_at(step, final)})
    return records


def write_job(
    sweep: Path,
    num: int,
    overrides: list[str],
    *,
    cluster: str = "alpha",
    lr: float = 1e-3,
    scheduler: str = "cosine",
    wandb: bool = False,
    wandb_ran: bool | None = None,
    records: list[dict] | None = None,
    status: dict | None = None,
    config: bool = True,
    sweeper: str = BASIC_SWEEPER,
    sweeper_params: dict | None = None,
    truncated_tail: bool = False,
) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    train_cfg = {
        "name": "lr_sweep",
        "dump_base": "/data/out",
        "steps": STEPS,
        "seed": 42,
        "cluster": {"name": cluster, "provider": "together", "gpus_per_node": 8},
        "model": {"dim": 64, "n_layers": 2, "n_heads": 2, "vocab_size": 258},
        "optim": {"optimizer": "adamw", "scheduler": scheduler, "lr": lr, "warmup": 10},
        "logging": {
            "freq": 5,
            "val_loss_every": 10,
            "val_loss_batches": 2,
            "wandb": {"project": "tanishqbot", "entity": "tk07", "mode": None} if wandb else None,
        },
    }
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(train_cfg))
    hydra_cfg = {
        "hydra": {
            "mode": "MULTIRUN",
            "sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}"},
            "sweeper": {"_target_": sweeper, "params": sweeper_params},
            "launcher": {"_target_": "hydra_plugins.lingua_sweep_launcher.MultiClusterLauncher"},
            "overrides": {"hydra": ["hydra/launcher=multicluster"], "task": overrides},
            "job": {"name": "train", "num": num, "id": f"job_id_for_{num}"},
        }
    }
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_cfg))
    if config:
        (job / "config.yaml").write_text(yaml.safe_dump(train_cfg))
    if wandb if wandb_ran is None else wandb_ran:  # what wandb.init leaves in the run dir
        (job / "wandb" / f"offline-run-20250101_120000-{num:016d}").mkdir(parents=True)
    if records is not None:
        text = "".join(json.dumps(r) + "\n" for r in records)
        if truncated_tail:
            text += '{"step": 65, "time": 17000'  # the line a running job is writing now
        (job / "metrics.jsonl").write_text(text)
    if status is not None:
        (job / "status.json").write_text(json.dumps(status, indent=1))
    return job


def status_json(state: str, job_id: str, cluster: str, **extra) -> dict:
    return {
        "status": state,
        "error": None,
        "traceback": None,
        "job_id": job_id,
        "cluster": cluster,
        "host": f"{cluster}-node-1",
        "started": T0 - 5,
        "updated": T0,
        **extra,
    }


def overrides_for(lr: float, scheduler: str, cluster: str) -> list[str]:
    return [
        f"optim.lr={lr}",
        f"optim.scheduler={scheduler}",
        "experiment=debug",
        "name=lr_sweep",
        f"cluster={cluster}",
    ]


@pytest.fixture
def grid_sweep(tmp_path: Path) -> Path:
    """`optim.lr=0.001,0.003,0.01 optim.scheduler=cosine,wsd` over clusters alpha and beta.

    0, 1 completed; 2 completed and best (resumed once, WandB on); 3 running with a half-written
    last line; 4 diverged and crashed at step 30; 5 failed before training (no config.yaml).
    """
    sweep = tmp_path / "lr_sweep" / "multirun" / "2025-01-01_12-00-00"
    sweep.mkdir(parents=True)
    # The basic sweeper saves the sweep's config, command line included, as multirun.yaml.
    command_line = ["optim.lr=0.001,0.003,0.01", "optim.scheduler=cosine,wsd", "experiment=debug"]
    sweeper = {"_target_": BASIC_SWEEPER, "params": None}
    multirun = {"hydra": {"overrides": {"task": command_line}, "sweeper": sweeper}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))

    def job(num, lr, scheduler, cluster, records, status, **kwargs):
        overrides = overrides_for(lr, scheduler, cluster)
        write_job(sweep, num, overrides, cluster=cluster, lr=lr, scheduler=scheduler,
                  records=records, status=status, **kwargs)  # fmt: skip

    def completed(job_id, cluster, final, finished=T0 + 2 * STEPS + 3):
        return status_json("COMPLETED", job_id, cluster, return_value=final, finished=finished)

    job(0, 0.001, "cosine", "alpha", metrics_records(STEPS, 3.40), completed("11_0", "alpha", 3.40))
    job(1, 0.001, "wsd", "alpha", metrics_records(STEPS, 3.35), completed("11_1", "alpha", 3.35))
    # Preempted at step 60 after logging a bogus high val loss, resumed from step 50: the
    # resumed run repeats steps 50-60, and its values are the ones that count.
    first_try = metrics_records(60, 3.1)
    for r in first_try:
        if r["step"] >= 50 and "loss/val" in r:
            r["loss/val"] = 9.9
    resumed = [r for r in metrics_records(STEPS, 3.10, t0=T0 + 30) if r["step"] >= 50]
    status = completed("12_0", "beta", 3.10, finished=T0 + 233)
    job(2, 0.003, "cosine", "beta", first_try + resumed, status, wandb=True)
    status = status_json("RUNNING", "12_1", "beta")
    job(3, 0.003, "wsd", "beta", metrics_records(60, 3.2), status, truncated_tail=True)
    diverged = metrics_records(30, 3.0)
    diverged[-1]["loss/val"] = 7.5  # higher than at step 20, so best val < final val
    error = "RuntimeError: loss is NaN | grad_norm=inf"  # a `|` to test markdown escaping
    traceback = f"Traceback (most recent call last):\n  ...\n{error}\n"
    status = status_json("FAILED", "11_2", "alpha", error=error, traceback=traceback)
    job(4, 0.01, "cosine", "alpha", diverged, {**status, "finished": T0 + 70})
    error = "ValueError: model.vocab_size=5 does not match tokenizer"
    status = status_json("FAILED", "12_2", "beta", error=error, finished=T0 - 1)
    job(5, 0.01, "wsd", "beta", None, status, config=False)
    return sweep


# --- collect ---------------------------------------------------------------------------------


def test_rows_sorted_by_final_val_loss_with_best_marked(grid_sweep):
    rows = results.collect(grid_sweep)
    # Completed 2 < 1 < 0, running 3 (step 60: loss_at(60, 3.2) = 4.29), diverged 4 (7.5),
    # then 5 with no val loss at all.
    assert [r.job for r in rows] == [2, 1, 0, 3, 4, 5]
    assert [r.best for r in rows] == [True, False, False, False, False, False]
    assert rows[0].final_val == pytest.approx(3.10)
    assert rows[3].final_val == pytest.approx(loss_at(60, 3.2))


def test_statuses_errors_and_progress(grid_sweep):
    rows = {r.job: r for r in results.collect(grid_sweep)}
    statuses = [rows[j].status for j in range(6)]
    assert statuses == ["COMPLETED"] * 3 + ["RUNNING", "FAILED", "FAILED"]
    assert rows[4].error == "RuntimeError: loss is NaN | grad_norm=inf"
    assert results_table.status_text(rows[4]) == "FAILED: RuntimeError: loss is NaN | grad_norm=inf"
    assert rows[5].error.startswith("ValueError: model.vocab_size=5")
    assert rows[0].error is None and results_table.status_text(rows[0]) == "COMPLETED"
    # Steps done / total; job 5 has no config.yaml, so the total comes from .hydra/config.yaml.
    assert [(rows[j].step, rows[j].steps) for j in (0, 3, 4, 5)] == [
        (100, 100),
        (60, 100),
        (30, 100),
        (None, 100),
    ]
    assert rows[4].best_val == pytest.approx(loss_at(20, 3.0)) and rows[4].final_val == 7.5
    assert rows[3].tokens_per_s == 1060.0  # the half-written step-65 line is skipped
    assert rows[0].wall_s == pytest.approx(208.0)  # status.json started -> finished
    clusters = [rows[j].cluster for j in range(6)]
    assert clusters == ["alpha", "alpha", "beta", "beta", "alpha", "beta"]


def test_resumed_run_takes_the_last_value_per_step(grid_sweep):
    row = next(r for r in results.collect(grid_sweep) if r.job == 2)
    metrics = results.read_metrics(grid_sweep / "2" / "metrics.jsonl")
    assert metrics[60]["loss/val"] == pytest.approx(loss_at(60, 3.10))  # not the first try's 9.9
    assert metrics[0]["loss/init"] == 10.6 and metrics[100]["loss/val"] == pytest.approx(3.10)
    assert row.best_val == pytest.approx(3.10)
    assert row.step == 100 and row.tokens_per_s == 1100.0


def test_wandb_run_name_only_when_configured(grid_sweep):
    rows = {r.job: r for r in results.collect(grid_sweep)}
    assert rows[2].wandb_run == "lr_sweep_beta_12_0"  # {name}_{cluster}_{job_id}
    assert [rows[j].wandb_run for j in (0, 1, 3, 4, 5)] == [""] * 5


def test_swept_params_are_the_overrides_that_vary(grid_sweep):
    rows = results.collect(grid_sweep)
    # experiment/name are constant; cluster varies but is the launcher's choice, not a param.
    assert all(list(r.params) == ["optim.lr", "optim.scheduler"] for r in rows)
    by_job = {r.job: r.params for r in rows}
    assert by_job[3] == {"optim.lr": "0.003", "optim.scheduler": "wsd"}
    assert (by_job[0]["optim.lr"], by_job[5]["optim.scheduler"]) == ("0.001", "wsd")
    # The same without multirun.yaml (another sweeper): varying values are enough.
    (grid_sweep / "multirun.yaml").unlink()
    assert list(results.collect(grid_sweep)[0].params) == ["optim.lr", "optim.scheduler"]


def test_sweep_syntax_counts_while_only_one_job_has_started(tmp_path):
    sweep = tmp_path / "sweep"
    write_job(sweep, 0, overrides_for(0.001, "cosine", "alpha"), records=metrics_records(20, 3.0))
    command_line = ["optim.lr=0.001,0.003", "optim.scheduler=cosine", "experiment=debug"]
    multirun = {"hydra": {"overrides": {"task": command_line}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    [row] = results.collect(sweep)
    assert row.params == {"optim.lr": "0.001"}
    assert row.best  # the only row with a val loss leads while nothing has completed


def test_best_prefers_a_completed_run(tmp_path):
    sweep = tmp_path / "sweep"
    write_job(
        sweep,
        0,
        overrides_for(0.001, "cosine", "alpha"),
        records=metrics_records(STEPS, 3.0),
        status=status_json("COMPLETED", "1_0", "alpha"),
    )
    # Preempted halfway with a lower val loss (made up): first in the order, but not "best".
    records = metrics_records(50, 3.0)
    records[-1]["loss/val"] = 2.5
    write_job(
        sweep,
        1,
        overrides_for(0.003, "cosine", "alpha"),
        records=records,
        status=status_json("PREEMPTED", "1_1", "alpha", error="Preempted: signal 15"),
    )
    rows = results.collect(sweep)
    assert [(r.job, r.best) for r in rows] == [(1, False), (0, True)]
    assert results_table.status_text(rows[0]) == "PREEMPTED: Preempted: signal 15"


def test_status_inferred_without_status_json(tmp_path):
    sweep = tmp_path / "sweep"
    write_job(
        sweep, 0, overrides_for(0.001, "cosine", "local"), records=metrics_records(STEPS, 3.0)
    )
    write_job(sweep, 1, overrides_for(0.003, "cosine", "local"), records=metrics_records(40, 3.0))
    write_job(sweep, 2, overrides_for(0.01, "cosine", "local"))
    rows = {r.job: r for r in results.collect(sweep)}
    assert [rows[j].status for j in range(3)] == ["COMPLETED", "RUNNING", "UNKNOWN"]
    assert rows[0].wall_s == pytest.approx(2.0 * STEPS)  # first to last metrics time
    assert rows[2].step is None and rows[2].final_val is None and rows[2].wall_s is None


def test_not_a_sweep_dir_is_a_user_error(tmp_path, grid_sweep):
    with pytest.raises(UserError, match="no such directory"):
        results.collect(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a sweep dir"):
        results.collect(tmp_path / "empty")
    with pytest.raises(UserError, match="one job of a sweep, try its parent"):
        results.collect(grid_sweep / "0")
    with pytest.raises(UserError, match="sweeps below it: .*2025-01-01_12-00-00"):
        results.collect(grid_sweep.parent)  # `.../multirun` instead of `.../multirun/<time>`


# --- optuna ----------------------------------------------------------------------------------


@pytest.fixture
def optuna_sweep(tmp_path: Path) -> Path:
    """`hydra/sweeper=optuna 'optim.lr=tag(log,interval(1e-4,1e-2))'`, three trials."""
    sweep = tmp_path / "optuna"
    params = {"optim.lr": "tag(log, interval(1e-4, 1e-2))"}
    for num, (lr, final) in enumerate([(0.0002, 3.6), (0.0041, 3.05), (0.0093, 3.3)]):
        write_job(
            sweep,
            num,
            [f"optim.lr={lr}", "optim.scheduler=cosine", "experiment=debug", "cluster=alpha"],
            lr=lr,
            records=metrics_records(STEPS, final),
            sweeper=OPTUNA_SWEEPER,
            sweeper_params=params,
            status=status_json(
                "COMPLETED", f"7_{num}", "alpha", return_value=final, finished=T0 + 210
            ),
        )
    results_yaml = {"name": "optuna", "best_params": {"optim.lr": 0.0041}, "best_value": 3.05}
    (sweep / "optimization_results.yaml").write_text(yaml.safe_dump(results_yaml))
    return sweep


def test_optuna_trials_and_objective(optuna_sweep):
    rows = results.collect(optuna_sweep)
    assert [(r.job, r.trial, r.objective, r.best) for r in rows] == [
        (1, 1, 3.05, True),
        (2, 2, 3.3, False),
        (0, 0, 3.6, False),
    ]
    assert all(list(r.params) == ["optim.lr"] for r in rows)  # scheduler is constant
    assert results_table.optuna_summary(optuna_sweep) == "optuna best value 3.05 at optim.lr=0.0041"
    header = results_table.to_markdown(rows).splitlines()[0]
    assert header.startswith("| best | job | trial | objective | optim.lr | cluster |")
    assert "wandb run" not in header  # no run had WandB configured
    table = list(csv.DictReader(io.StringIO(results_table.to_csv(rows))))
    assert [(d["trial"], d["objective"]) for d in table] == [
        ("1", "3.05"),
        ("2", "3.3"),
        ("0", "3.6"),
    ]


def test_optuna_in_progress_is_recognised_from_hydra_yaml(optuna_sweep):
    # Before the study ends there is no optimization_results.yaml, and one trial shows no
    # variation: the sweeper config still says it is Optuna and lr is searched.
    (optuna_sweep / "optimization_results.yaml").unlink()
    shutil.rmtree(optuna_sweep / "1")
    shutil.rmtree(optuna_sweep / "2")
    [row] = results.collect(optuna_sweep)
    assert (row.trial, row.objective, list(row.params)) == (0, 3.6, ["optim.lr"])


# --- journal: async Optuna trials, pruned ones ---------------------------------------------


def journal_for(
    index: int,
    trial: int | None,
    overrides: list[str],
    *,
    spans,
    status=None,
    value=None,
    error=None,
    step=None,
    cluster="alpha",
) -> list[dict]:
    """The records the controller writes for one job: registered, submitted, one RUNNING span
    per allocation (PENDING between them, as for a requeue), and its result."""
    start = spans[0][0] - 1
    out = [
        {"kind": "job", "t": start - 1, "index": index, "overrides": overrides,
         "config_hash": f"h{index}", "trial": trial},
        {"kind": "submitted", "t": start, "batch": f"b{index}", "cluster": cluster,
         "folder": "/f/%j", "tasks": 1, "job_ids": {str(index): f"9{index}"}},
    ]  # fmt: skip
    for begin, end in spans:
        out.append({"kind": "state", "t": begin, "index": index, "state": "RUNNING"})
        if (begin, end) != spans[-1]:
            out.append({"kind": "state", "t": end, "index": index, "state": "PENDING"})
    if status:
        out.append({"kind": "result", "t": spans[-1][1], "index": index, "status": status,
                    "value": value, "error": error, "step": step})  # fmt: skip
    return out


def write_journal(sweep: Path, records: list[dict], **header) -> None:
    head = {"kind": "sweep", "t": T0 - 100, "id": "abcd1234", "name": "lr_sweep", **header}
    text = "".join(json.dumps(r) + "\n" for r in [head, *records])
    (sweep / "journal.jsonl").write_text(text)


@pytest.fixture
def async_sweep(tmp_path: Path) -> Path:
    """`hydra/sweeper=async_optuna` with a pruner, mid-study: trial 0 completed, 1 pruned at
    step 20 (its job logged up to step 30 before the cancel landed), 2 failed, 3 completed
    (the best), 4 still pending (no dir yet)."""
    sweep = tmp_path / "async"
    params = {"optim.lr": "tag(log, interval(1e-4, 1e-2))"}
    records = []
    plan = [(0.0002, 3.6, "COMPLETED"), (0.0093, 2.0, "PRUNED"), (0.01, 3.0, "FAILED"),
            (0.0041, 3.05, "COMPLETED")]  # fmt: skip
    for num, (lr, final, state) in enumerate(plan):
        overrides = [f"optim.lr={lr}", "experiment=debug"]
        last = {"PRUNED": 30, "FAILED": 40}.get(state, STEPS)
        write_job(sweep, num, overrides, lr=lr, records=metrics_records(last, final),
                  sweeper="hydra_plugins.lingua_sweep_launcher.async_optuna_sweeper."
                  "AsyncOptunaSweeper", sweeper_params=params,
                  status=status_json("RUNNING", f"9{num}", "alpha"))  # fmt: skip
        records += journal_for(
            num, num, overrides, spans=[(T0, T0 + 2 * last + 5)], status=state,
            value=final if state == "COMPLETED" else None,
            error={"PRUNED": "pruned at step 20", "FAILED": "RuntimeError: loss is nan"}.get(state),
            step=20 if state == "PRUNED" else None,
        )  # fmt: skip
    records.append({"kind": "job", "t": T0, "index": 4, "config_hash": "h4", "trial": 4,
                    "overrides": ["optim.lr=0.001", "experiment=debug"]})  # fmt: skip
    write_journal(sweep, records, study={"name": "lr", "directions": ["minimize"]})
    return sweep


def test_pruned_trials_their_step_and_the_study_best(async_sweep):
    rows = {r.job: r for r in results.collect(async_sweep)}
    assert {j: r.status for j, r in rows.items()} == {
        0: "COMPLETED", 1: "PRUNED", 2: "FAILED", 3: "COMPLETED", 4: "PENDING",
    }  # fmt: skip
    assert [rows[j].trial for j in range(5)] == [0, 1, 2, 3, 4]
    assert rows[1].step == 20 and rows[1].error is None  # the step it was pruned at
    assert rows[1].final_val == pytest.approx(loss_at(20, 2.0))  # not step 30's, after it
    assert rows[2].error == "RuntimeError: loss is nan"
    assert [j for j, r in rows.items() if r.best] == [3]  # the pruned 2.0 is no result
    assert rows[3].objective == 3.05 and rows[4].params == {"optim.lr": "0.001"}
    summary = results_table.optuna_summary(async_sweep)
    assert summary.startswith("optuna best value 3.05 at optim.lr=0.0041 (trial 3); 5 trials")
    assert "1 pruned" in summary and "1 failed" in summary
    text = results_table.table_text(list(rows.values()), width=120)
    assert re.search(r"\b1\s+1\s+.*PRUNED\s+20/100", text), text


def test_plot_marks_pruned_curves(async_sweep):
    from matplotlib.figure import Figure

    rows = results.collect(async_sweep)
    ax = Figure().subplots()
    results_plot._plot_curves(ax, rows, async_sweep)
    crosses = [line for line in ax.lines if line.get_marker() == "x"]
    assert len(crosses) == 2  # loss/out and loss/val of the one pruned trial
    assert all(line.get_xdata()[-1] <= 20 for line in crosses)  # cut where it was stopped
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum("pruned at 20" in label for label in labels) == 1


# --- the table's rules (#14) ------------------------------------------------------------------


def test_terminal_table_fits_80_columns_without_cutting_status_or_losses(grid_sweep, async_sweep):
    from rich.console import Console

    for sweep in (grid_sweep, async_sweep):
        rows = results.collect(sweep)
        buffer = io.StringIO()
        results_table.print_table(rows, console=Console(file=buffer, width=80, color_system=None))
        text = buffer.getvalue()
        assert max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
        assert "…" not in text, text  # nothing cut short
        for r in rows:  # each row's first line: its status and losses, whole
            line = next(line for line in text.splitlines()
                        if re.match(rf"\s*★?\s*{r.job}\s", line))  # fmt: skip
            assert re.search(rf"\b{r.status}\b", line), line
            assert _loss(r.final_val) in line, line  # (best val may be dropped: low value)
        wide = results_table.table_text(rows, width=250)
        table, _, note = text.partition("(80 columns: ")
        assert "tok/s" in wide and "tok/s" not in table  # a low-value column made room
        assert "tok/s" in note and "left out" in note  # and the table says so
        for r in rows:  # the error wraps, but all of it is there
            assert (r.error or "").replace(" ", "") in re.sub(r"\s+", "", text)


def _loss(value):
    return "" if value is None else f"{value:.4f}"


def test_swept_floats_print_with_3_significant_digits(tmp_path):
    sweep = tmp_path / "sweep"
    for num, lr in enumerate(["0.00010979877869591871", "0.0031622776601683794"]):
        write_job(sweep, num, [f"optim.lr={lr}", "steps=100", f"model.dim={64 * (num + 1)}"],
                  records=metrics_records(STEPS, 3.0 + num))  # fmt: skip
    rows = results.collect(sweep)
    for text in (results_table.table_text(rows), results_table.to_markdown(rows)):
        assert "0.00011" in text and "0.00316" in text and "0.000109" not in text
        assert " 128 " in text  # an int stays as it is
    assert "0.00010979877869591871" in results_table.to_csv(rows)  # csv keeps the raw value
    fmt = results_table.fmt_param
    assert [fmt("3e-3"), fmt("1e6"), fmt("12"), fmt("cosine"), fmt("[1,2]"), fmt("nan")] == [
        "0.003", "1e+06", "12", "cosine", "[1,2]", "nan",
    ]  # fmt: skip


def test_a_lone_failed_job_is_never_best(tmp_path):
    sweep = tmp_path / "sweep"
    records = metrics_records(30, 3.0)  # finite val losses, then it diverged
    status = status_json("FAILED", "1_0", "alpha", error="RuntimeError: loss is nan")
    write_job(sweep, 0, overrides_for(0.01, "cosine", "alpha"), records=records, status=status)
    [row] = results.collect(sweep)
    assert row.status == "FAILED" and row.final_val is not None and not row.best
    # Beside a running job, the running one leads.
    write_job(sweep, 1, overrides_for(0.001, "cosine", "alpha"), records=metrics_records(20, 4),
              status=status_json("RUNNING", "1_1", "alpha"))  # fmt: skip
    assert [(r.job, r.best) for r in results.collect(sweep)] == [(0, False), (1, True)]


SUBMITIT_TRACE = """FailedJobError: Job (task=0) failed during processing with trace:
----------------------
Traceback (most recent call last):
  File "/x/submitit/core/submission.py", line 55, in process_job
    result = delayed.result()
  File "/x/lingua_sweep/train.py", line 480, in step
    raise NonFiniteLoss(step, loss)
lingua_sweep.train.NonFiniteLoss: loss is nan at step 3 (grad_norm=inf)

----------------------
You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:
  - /x/.submitit/12_0/12_0_0_log.err
"""


def test_error_is_the_real_last_line_not_submitits_wrapper(tmp_path):
    sweep = tmp_path / "sweep"
    wrapper = SUBMITIT_TRACE.splitlines()[0]
    status = status_json("FAILED", "12_0", "alpha", error=wrapper, traceback=SUBMITIT_TRACE)
    write_job(sweep, 0, overrides_for(0.01, "cosine", "alpha"), records=metrics_records(3, 3),
              status=status)  # fmt: skip
    [row] = results.collect(sweep)
    expected = "lingua_sweep.train.NonFiniteLoss: loss is nan at step 3 (grad_norm=inf)"
    assert row.error == expected
    assert results.error_line(SUBMITIT_TRACE) == expected  # the whole text as the error
    assert results.error_line("ValueError: bad\nhint: do this") == "ValueError: bad"


def test_wall_counts_every_allocation_of_a_requeued_job(tmp_path):
    sweep = tmp_path / "sweep"
    # Preempted at step 50 after 100 s, requeued, resumed from step 40 for another 130 s.
    first = [r for r in metrics_records(50, 3.0) if r["step"] <= 50]
    second = [r for r in metrics_records(STEPS, 3.0, t0=T0 + 120) if r["step"] >= 40]
    status = status_json("COMPLETED", "5_0", "alpha", started=T0 + 195, finished=T0 + 325)
    write_job(sweep, 0, overrides_for(0.001, "cosine", "alpha"), records=first + second,
              status=status)  # fmt: skip
    [row] = results.collect(sweep)
    assert row.wall_s == pytest.approx(100 + 130)  # not just the last allocation's 130 s
    # With the journal: its RUNNING spans, both of them.
    spans = [(T0, T0 + 100), (T0 + 190, T0 + 330)]
    write_journal(sweep, journal_for(0, None, ["optim.lr=0.001"], spans=spans,
                                     status="COMPLETED", value=3.0))  # fmt: skip
    [row] = results.collect(sweep)
    assert row.wall_s == pytest.approx(100 + 140)


def test_wandb_column_empty_when_wandb_never_ran(tmp_path):
    sweep = tmp_path / "sweep"
    # WandB configured, but the job failed before wandb.init.
    status = status_json("FAILED", "3_0", "alpha", error="ValueError: no data")
    write_job(sweep, 0, overrides_for(0.001, "cosine", "alpha"), wandb=True, wandb_ran=False,
              status=status)  # fmt: skip
    write_job(
        sweep,
        1,
        overrides_for(0.003, "cosine", "alpha"),
        wandb=True,
        records=metrics_records(STEPS, 3.0),
        status=status_json("COMPLETED", "3_1", "alpha"),
    )
    rows = {r.job: r for r in results.collect(sweep)}
    assert (rows[0].wandb_run, rows[1].wandb_run) == ("", "lr_sweep_alpha_3_1")
    shutil.rmtree(sweep / "1" / "wandb")
    assert "wandb run" not in results_table.to_markdown(results.collect(sweep)).splitlines()[0]


def test_torn_and_invalid_metrics_lines_are_skipped(tmp_path):
    from lingua_sweep.sweep.tails import val_losses

    good = [
        {"step": 10, "time": T0, "loss/val": 5.0},
        {"step": 20, "time": T0 + 1, "loss/val": 4.0},
    ]
    lines = [json.dumps(good[0]).encode(), b'{"step": 15, "time": 17', b"\x00" * 40,
             b'{"step": 16, "loss/val": 3.0\xff\xfe}', b"[1, 2]", b'"text"',
             b'{"step": "17", "loss/val": 1.0}', b'{"step": true, "loss/val": 1.0}',
             b'{"step": -1, "loss/val": 1.0}', b'{"step": 18, "loss/val": 1.0}{"step": 19}',
             json.dumps(good[1]).encode(), b'{"step": 30, "loss/val": NaN}',
             b'{"step": 31, "loss/v']  # fmt: skip
    sweep = tmp_path / "sweep"
    job = write_job(sweep, 0, overrides_for(0.001, "cosine", "alpha"), records=[])
    (job / "metrics.jsonl").write_bytes(b"\n".join(lines))
    assert list(results.read_metrics(job / "metrics.jsonl")) == [10, 20, 30]
    [row] = results.collect(sweep)
    assert (row.step, row.best_val) == (30, 4.0)
    text = (job / "metrics.jsonl").read_bytes().decode(errors="replace")
    assert val_losses(text) == {10: 5.0, 20: 4.0}  # what the pruner is told: finite values only


# --- renderers -------------------------------------------------------------------------------


def test_markdown_parses(grid_sweep):
    rows = results.collect(grid_sweep)
    lines = results_table.to_markdown(rows).splitlines()
    assert len(lines) == 2 + len(rows)

    def cells(line: str) -> list[str]:
        assert line.startswith("| ") and line.endswith(" |")
        # Split on unescaped pipes only, as markdown renderers do.
        parts = line[2:-2].replace("\\|", "\0").split(" | ")
        return [p.replace("\0", "|") for p in parts]

    header = cells(lines[0])
    assert header[:4] == ["best", "job", "optim.lr", "optim.scheduler"]
    assert {"cluster", "status", "steps", "final val", "wandb run"} <= set(header)
    assert cells(lines[1]) == ["---"] * len(header)
    body = [dict(zip(header, cells(line), strict=True)) for line in lines[2:]]
    assert [b["job"] for b in body] == ["2", "1", "0", "3", "4", "5"]
    assert [b["best"] for b in body] == ["★", "", "", "", "", ""]
    assert body[4]["status"] == "FAILED: RuntimeError: loss is NaN | grad_norm=inf"
    assert (body[0]["final val"], body[0]["steps"]) == ("3.1000", "100/100")
    assert body[3]["steps"] == "60/100"
    assert body[0]["wandb run"] == "lr_sweep_beta_12_0"


def test_csv_parses(grid_sweep):
    rows = results.collect(grid_sweep)
    table = list(csv.DictReader(io.StringIO(results_table.to_csv(rows))))
    assert len(table) == len(rows)
    assert [t["job"] for t in table] == ["2", "1", "0", "3", "4", "5"]
    assert "trial" not in table[0]  # not an Optuna sweep
    failed = table[4]
    assert failed["status"] == "FAILED"
    assert failed["error"] == "RuntimeError: loss is NaN | grad_norm=inf"
    assert [failed[k] for k in ("optim.lr", "optim.scheduler", "cluster")] == [
        "0.01",
        "cosine",
        "alpha",
    ]
    assert float(table[0]["final_val_loss"]) == pytest.approx(3.10)
    assert (table[0]["best"], table[1]["best"]) == ("true", "false")
    assert (table[5]["final_val_loss"], table[5]["step"], table[5]["steps"]) == ("", "", "100")
    assert float(table[2]["wall_s"]) == pytest.approx(208.0)


def test_table_text(grid_sweep):
    text = results_table.table_text(results.collect(grid_sweep), width=250)
    assert re.search(r"FAILED .* RuntimeError: loss is NaN", text)  # status, then error column
    for expected in [
        "optim.lr",
        "COMPLETED",
        "RUNNING",
        "★",
        "lr_sweep_beta_12_0",
        "3m28s",
        "1,100",
    ]:
        assert expected in text


def test_plot_is_a_png(grid_sweep, tmp_path):
    import matplotlib.image

    rows = results.collect(grid_sweep)
    out = results_plot.plot(rows, grid_sweep, tmp_path / "sweep.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.05  # something was drawn, not a blank canvas


# --- CLI -------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "250", "HOME": str(Path.home())}
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_cli_table(grid_sweep):
    proc = _cli("results", str(grid_sweep))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    [best] = [i for i, line in enumerate(lines) if "★" in line]
    [running] = [i for i, line in enumerate(lines) if "RUNNING" in line]
    assert "lr_sweep_beta_12_0" in lines[best] and best < running
    assert re.search(r"FAILED .* RuntimeError: loss is NaN", proc.stdout)


def test_cli_markdown_to_file_with_plot(grid_sweep, tmp_path):
    out, png = tmp_path / "results.md", tmp_path / "plot.png"
    proc = _cli(
        "results", str(grid_sweep), "--format", "md", "--output", str(out), "--plot", str(png)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # the table went to the file
    assert out.read_text() == results_table.to_markdown(results.collect(grid_sweep))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_not_a_sweep_dir(tmp_path):
    proc = _cli("results", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "is not a sweep dir" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_csv_and_bad_format_in_process(grid_sweep, capsys):
    assert main(["results", str(grid_sweep), "--format", "csv"]) == 0
    assert len(list(csv.DictReader(io.StringIO(capsys.readouterr().out)))) == 6
    with pytest.raises(SystemExit) as exit_info:
        main(["results", str(grid_sweep), "--format", "html"])
    assert exit_info.value.code == 2


def test_rows_trained_on_different_data_are_told_apart(grid_sweep, capsys):
    for job, fingerprint in [(0, "aaaa111111"), (1, "bbbb222222"), (2, "aaaa111111")]:
        data = {"val_file": "/data/val.jsonl", "train_files": 2, "fingerprint": fingerprint}
        (grid_sweep / str(job) / "data.json").write_text(json.dumps(data))
    rows = results.collect(grid_sweep)
    assert {r.job: r.data for r in rows if r.data} == {0: "aaaa111111", 1: "bbbb222222",
                                                       2: "aaaa111111"}  # fmt: skip
    table = list(csv.DictReader(io.StringIO(results_table.to_csv(rows))))
    assert {t["job"]: t["data"] for t in table}["1"] == "bbbb222222"
    assert main(["results", str(grid_sweep), "--format", "md"]) == 0
    captured = capsys.readouterr()
    assert "trained on 2 different data sets" in captured.err
    assert "bbbb222222" in captured.out  # a `data` column, only when the data differ
