"""What a run logs: the every-n rule, metrics.jsonl keys, and WandB naming (real wandb, offline)."""

import json

import pytest
from test_train import TINY, corpus_root, one_thread, read_metrics, run_inprocess, series
from wandb_offline import run_info

from lingua_sweep import metrics
from lingua_sweep.metrics import every_n_steps

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.mark.parametrize(
    ("step", "freq", "fires"),
    [
        (10, 10, True),
        (20, 10, True),
        (5, 10, False),
        (1, 1, True),
        (7, 0, False),  # 0 disables
        (7, -1, False),  # the old fork's bug: x % -1 == 0 fired every step
        (0, -1, False),
    ],
)
def test_every_n_steps(step, freq, fires):
    assert every_n_steps(step, freq) is fires


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return corpus_root(tmp_path_factory)


def test_metrics_jsonl_keys_and_cadence(data_root, tmp_path):
    overrides = ["logging.freq=4", "logging.val_loss_every=3", "steps=8"]
    final = run_inprocess(tmp_path, *TINY, f"data.root={data_root}", *overrides)
    records = read_metrics(tmp_path)
    assert all("step" in r for r in records)
    first = records[0]
    assert first["step"] == 0 and "loss/init" in first
    assert {"params", "param_bytes_local", "micro_batch_size", "grad_acc_steps"} <= first.keys()
    assert list(series(records, "loss/init")) == [0]
    assert list(series(records, "loss/out")) == [4, 8]
    assert list(series(records, "loss/val")) == [3, 6, 8]  # and always the last step
    assert series(records, "loss/val")[8] == final  # the Optuna objective
    for r in records:
        if "loss/out" in r:
            assert {"lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu"} <= r.keys()
            assert "mfu" not in r  # no peak FLOP/s for a CPU


def test_loss_out_is_the_mean_over_the_logging_window(data_root, tmp_path):
    """Logging cadence is bookkeeping: loss/out every 2 steps is the mean of the per-step ones."""
    every = read_metrics(_run(data_root, tmp_path / "every", "logging.freq=1"))
    pairs = read_metrics(_run(data_root, tmp_path / "pairs", "logging.freq=2"))
    per_step, windowed = series(every, "loss/out"), series(pairs, "loss/out")
    for step, value in windowed.items():
        assert value == pytest.approx((per_step[step - 1] + per_step[step]) / 2, rel=1e-6)
    assert series(every, "loss/val") == series(pairs, "loss/val")  # same training either way


def _run(data_root, run_dir, *overrides):
    run_inprocess(run_dir, *TINY, f"data.root={data_root}", *overrides)
    return run_dir


def test_wandb_offline_run_is_named_grouped_and_tagged(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = ["name=lr_sweep", "logging.wandb.mode=offline", "logging.wandb.project=lingua_test"]
    run_inprocess(
        tmp_path,
        *TINY,
        f"data.root={data_root}",
        "steps=3",
        *overrides,
        environ={"SLURM_JOB_ID": "4242"},
    )
    info = run_info(tmp_path)  # the offline run under the run dir's wandb/
    assert info["name"] == "lr_sweep_local_4242"
    assert info["group"] == "lr_sweep/local"
    assert info["tags"] == ["local", "local", "cpu", "lr_sweep", "job_4242"]
    assert info["project"] == "lingua_test"
    assert {"loss/init", "loss/out", "loss/val"} <= info["history_keys"]


# --- metrics.jsonl survives kills --------------------------------------------------------


def test_read_metrics_skips_torn_and_invalid_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 0, "loss/init": 5.5}\n'
        "not json\n"
        '["a list"]\n'
        '{"no": "step"}\n'
        '{"step": 1, "loss/out": 5.0}\n'
        '{"step": 2, "loss/o'  # torn by a kill mid-write
    )
    assert metrics.read_metrics(path) == [
        {"step": 0, "loss/init": 5.5},
        {"step": 1, "loss/out": 5.0},
    ]


def test_a_torn_last_line_does_not_stop_the_resume(data_root, tmp_path):
    """Killed while writing step 6's record, after the checkpoint of step 4: every later
    resume failed with JSONDecodeError. Now the file is cut back to step 4 and continued."""
    overrides = [*TINY, f"data.root={data_root}", "checkpoint.dump.every=4"]
    run_inprocess(tmp_path, *overrides)
    reference = read_metrics(tmp_path)
    killed = [json.dumps(r) + "\n" for r in reference if r["step"] < 6]
    (tmp_path / "metrics.jsonl").write_text("".join(killed) + '{"step": 6, "loss/o')

    run_inprocess(tmp_path, *overrides)
    got = read_metrics(tmp_path)  # strict: every line parses
    assert [r["step"] for r in got] == [r["step"] for r in reference]  # in order, none twice
    for key in ("loss/init", "loss/out", "loss/val", "grad_norm"):
        assert series(got, key) == series(reference, key), key


def test_a_rerun_without_a_checkpoint_starts_the_metrics_over(data_root, tmp_path):
    """Killed before the first checkpoint, rerun: steps went 0,1,2,3,0,1,... (loss/init twice)."""
    overrides = [*TINY, f"data.root={data_root}", "steps=3"]
    run_inprocess(tmp_path, *overrides)
    first = read_metrics(tmp_path)
    run_inprocess(tmp_path, *overrides)
    again = read_metrics(tmp_path)
    assert [r["step"] for r in again] == [r["step"] for r in first] == [0, 1, 2, 3, 3]
    assert series(again, "loss/out") == series(first, "loss/out")
