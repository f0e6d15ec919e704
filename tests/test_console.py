"""What a person sees of a run: console lines, WandB without a key, `--info`, unknown keys."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "experiment=debug", "steps=8", "logging.freq=4", "logging.val_loss_every=4",
    "model.dim=32", "model.n_layers=1", "data.batch_size=4", "data.seq_len=64",
]  # fmt: skip


def run(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "LINGUA_", "WANDB_", "NETRC"))}  # fmt: skip
    env["HOME"] = str(home)  # no ~/.netrc: no WandB key anywhere
    env["LINGUA_SWEEP_CACHE"] = os.environ.get(
        "LINGUA_SWEEP_CACHE", str(Path.home() / ".cache" / "lingua_sweep")
    )  # the embedded corpus, built once per machine
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_the_console_shows_progress_and_wandb_without_a_key_runs_offline(tmp_path):
    proc = run(*SMALL, "logging.wandb.mode=online", f"hydra.run.dir={tmp_path / 'run'}",
               home=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    lines = [line.split(" - ", 1)[-1] for line in out.splitlines()]
    assert f"run dir: {tmp_path / 'run'}" in lines
    assert any(
        re.fullmatch(r"debug on local \(cpu\): 8 steps; model dim 32 .*", ln) for ln in lines
    )
    steps = [
        ln
        for ln in lines
        if re.fullmatch(
            r"step [48]/8 \| loss \d+\.\d{4} \| lr \S+ \| [\d,]+ tok/s \| ETA \d+:\d\d:\d\d", ln
        )
    ]
    assert len(steps) == 2, out[-3000:]
    assert sum(bool(re.fullmatch(r"step [48]/8 \| val loss \d+\.\d{4}", ln)) for ln in lines) == 2
    assert any(ln.startswith("done: step 8/8 in ") for ln in lines)
    # WandB: one warning line naming both fixes, then an offline run; never a traceback.
    warnings = [ln for ln in lines if "WandB has no API key" in ln]
    assert len(warnings) == 1 and "wandb login" in warnings[0]
    assert "logging.wandb.mode=offline" in warnings[0]
    assert "Traceback" not in out and "UsageError" not in out
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "run" / "train.log").read_text().count("| val loss ") == 2


def test_the_console_is_quiet_under_disabled_job_logging(tmp_path):
    proc = run(*SMALL, "steps=2", "logging.wandb=null", "hydra/job_logging=disabled",
               f"hydra.run.dir={tmp_path / 'run'}", home=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step " not in proc.stdout + proc.stderr


def test_info_works_and_unknown_keys_fail_with_or_without_plus(tmp_path):
    info = run("--info", home=tmp_path, timeout=60)
    assert info.returncode == 0 and "Installed Hydra Plugins" in info.stdout, info.stderr
    for typo in ("optim.lrr=1", "+optim.lrr=1"):
        proc = run("experiment=debug", typo, home=tmp_path, timeout=60)
        assert proc.returncode == 2, (typo, proc.stderr)
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("error: ") and "lrr" in line and "--cfg job" in line
