"""What a run logs: the every-n rule, metrics.jsonl keys, and WandB naming (real wandb, offline)."""

import pytest
from test_train import TINY, corpus_root, one_thread, read_metrics, run_inprocess, series
from wandb_offline import run_info

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
