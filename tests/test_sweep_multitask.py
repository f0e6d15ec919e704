"""Jobs shaped like the real clusters' jobs: several tasks (one per GPU), several nodes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sweep_helpers import (
    REPO,
    TINY,
    clean_env,
    journal_records,
    results_rows,
    run_sweep,
    sacct_jobs,
)

RANK_APP = REPO / "tests" / "apps" / "rank_app.py"


def app_sweep(tmp_path: Path, testbed, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(RANK_APP), "-m", "hydra/launcher=multicluster",
        f"hydra.searchpath=[file://{testbed.conf_dir}]", "hydra.launcher.poll_interval_s=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def results(sweep_dir: Path) -> dict[int, dict]:
    return {r["index"]: r for r in journal_records(sweep_dir) if r["kind"] == "result"}


@pytest.mark.slurm
@pytest.mark.parametrize(
    "shape", [["hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1"],
              ["hydra.launcher.tasks_per_node=2"]], ids=["2x1", "1x2"],
)  # fmt: skip
def test_a_multi_task_job_returns_rank_0s_value(tmp_path, slurm_testbed, shape):
    result = app_sweep(tmp_path, slurm_testbed, "value=3", "hydra.launcher.clusters=[alpha]",
                       *shape)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = [r for r in journal_records(tmp_path / "sweep") if r["kind"] == "submitted"]
    assert job["tasks"] == 2
    assert results(tmp_path / "sweep")[0]["value"] == 302  # rank 0's value, world size 2


@pytest.mark.slurm
def test_a_failing_rank_fails_the_job_naming_that_rank(tmp_path, slurm_testbed):
    result = app_sweep(
        tmp_path,
        slurm_testbed,
        "value=1",
        "fail_rank=1",
        "sleep_s=1",
        "hydra.launcher.clusters=[alpha]",
        "hydra.launcher.tasks_per_node=2",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    res = results(tmp_path / "sweep")[0]
    assert res["status"] == "FAILED"
    assert res["error"].startswith("rank 1: ValueError: boom on rank 1 of 2 (alpha)"), res
    header = journal_records(tmp_path / "sweep")[0]
    (state,) = sacct_jobs(slurm_testbed, "alpha", f"rank_app.{header['id']}.", at_least=1).values()
    assert state == "FAILED"


@pytest.mark.slurm
@pytest.mark.parametrize(
    "shape",
    [
        ["hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1"],
        ["hydra.launcher.tasks_per_node=2"],
    ],
    ids=["2x1", "1x2"],
)
def test_training_over_two_tasks_equals_torchrun_on_one_machine(tmp_path, testbed, shape):
    data_root = yaml.safe_load((testbed.cluster_conf_dir / "alpha.yaml").read_text())["data_root"]
    result = run_sweep(tmp_path, testbed, "optim.lr=3e-3", "hydra.launcher.clusters=[alpha]",
                       *shape)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = results_rows(tmp_path / "sweep")
    assert row["status"] == "COMPLETED"
    swept = [json.loads(line) for line in (tmp_path / "sweep" / "0" / "metrics.jsonl").open()]
    assert swept[0]["world_size"] == 2

    reference = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", *TINY, "optim.lr=3e-3", "logging.wandb=null", f"data.root={data_root}",
           f"hydra.run.dir={reference}"]  # fmt: skip
    ref = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").open()]
    for key in ("loss/init", "loss/out", "loss/val"):
        got = {r["step"]: r[key] for r in swept if key in r}
        want = {r["step"]: r[key] for r in expected if key in r}
        assert got.keys() == want.keys() and got
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-5), (key, step)
    assert float(row["final_val_loss"]) == pytest.approx(expected[-1]["loss/val"], rel=1e-5)
