"""Running real sweeps on the testbed from tests: the command, Slurm's view, held nodes."""

import contextlib
import csv
import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=debug",
    "steps=12",
    "logging.freq=4",
    "logging.val_loss_every=6",
    "model.dim=32",
    "model.n_layers=1",
    "data.batch_size=4",
    "data.seq_len=64",
]
LINGUA_SWEEP = str(Path(sys.executable).parent / "lingua-sweep")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_", "WANDB_"))}
    env["WANDB_MODE"] = "offline"
    env.update(extra)
    return env


def sweep_cmd(
    testbed,
    sweep_dir: Path,
    *args: str,
    script: Path = REPO / "train.py",
    wandb: bool = False,
    conf_dir: Path | None = None,
) -> list[str]:
    return [
        sys.executable,
        str(script),
        "-m",
        *TINY,
        "logging.wandb.mode=offline" if wandb else "logging.wandb=null",
        "hydra/launcher=multicluster",
        f"hydra.searchpath=[file://{conf_dir or testbed.conf_dir}]",
        "hydra.launcher.poll_interval_s=1",
        "hydra.launcher.probe_every_s=2",
        f"hydra.sweep.dir={sweep_dir}",
        *args,
    ]


def run_sweep(tmp_path: Path, testbed, *args: str, timeout=600, env=None, **kw):
    cmd = sweep_cmd(testbed, tmp_path / "sweep", *args, **kw)
    return subprocess.run(cmd, cwd=tmp_path, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def slurm(testbed, cluster: str, *argv: str, check=True, stderr=False) -> str:
    """A Slurm command on a testbed cluster: alpha here, beta through its login node. Its
    output (`stderr`: with its errors, where sbatch --test-only answers)."""
    if cluster == "alpha":
        cmd, env = list(argv), {**os.environ, **testbed.env_alpha()}
    else:
        # One quoted command line: ssh joins its arguments with spaces for the remote shell.
        cmd = ["ssh", "-F", str(testbed.ssh_config), testbed.beta_login, shlex.join(argv)]
        env = None
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=check)
    return out.stdout + out.stderr if stderr else out.stdout


def sacct_jobs(
    testbed, cluster: str, name_prefix: str | None = None, *, at_least: int = 0
) -> dict[str, str]:
    """{job id: state} of the last two hours' jobs, optionally only those of one sweep.

    slurmdbd learns of a job a moment after slurmctld (which the launcher may have asked), so
    with `at_least` it waits up to 15 s for that many final records.
    """
    deadline = time.monotonic() + 15
    while True:
        jobs = _sacct_jobs(testbed, cluster, name_prefix)
        done = [s for s in jobs.values() if s not in ("PENDING", "RUNNING", "REQUEUED")]
        if len(done) >= at_least or time.monotonic() > deadline:
            return jobs
        time.sleep(0.5)


def _sacct_jobs(testbed, cluster: str, name_prefix: str | None) -> dict[str, str]:
    out = slurm(testbed, cluster, "sacct", "-X", "-n", "-P", "-S", "now-2hours",
                "-o", "JobID,JobName%100,State")  # fmt: skip
    jobs = {}
    for line in out.splitlines():
        job_id, name, state = line.split("|")
        if "[" in job_id or (name_prefix and not name.startswith(name_prefix)):
            continue
        jobs[job_id] = state.split()[0]
    return jobs


def wait_for(predicate, timeout: float, what: str = "the condition"):
    """predicate()'s first truthy value, polled until `timeout` s; else the test fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def one_job_per_node(testbed) -> str:
    """The launcher override that makes each job take a whole node of the batch partition."""
    cpus = slurm(testbed, "alpha", "sinfo", "-h", "-p", "batch", "-N", "-o", "%c").split()[0]
    return f"hydra.launcher.cpus_per_task={int(cpus)}"


def hold_node(testbed, cluster: str = "alpha") -> str:
    """Occupies one node with a sleeping job; returns its id (scancel it after)."""
    out = slurm(testbed, cluster, "sbatch", "--parsable", "-p", "batch", "-N1", "--exclusive",
                "--output=/dev/null", "--wrap", "sleep 600")  # fmt: skip
    job_id = out.strip().split(";")[0]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # held means running, not just submitted
        if slurm(testbed, cluster, "squeue", "-h", "-j", job_id, "-o", "%T").strip() == "RUNNING":
            return job_id
        time.sleep(0.2)
    slurm(testbed, cluster, "scancel", job_id, check=False)
    raise AssertionError(f"the node-holding job {job_id} never started on {cluster}")


def journal_records(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / "journal.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a torn line
            out.append(json.loads(line))
    return out


def results_rows(sweep_dir: Path) -> list[dict]:
    out = subprocess.run([LINGUA_SWEEP, "results", str(sweep_dir), "--format", "csv"],
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    return list(csv.DictReader(io.StringIO(out)))


def status_json(sweep_dir: Path, *args: str) -> dict:
    argv = [LINGUA_SWEEP, "status", str(sweep_dir), "--json", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out)


def cancel_leftovers(testbed, sweep_dir: Path) -> None:
    """A failed test's sweep may leave jobs in Slurm: cancel them by the sweep's job names, so
    they do not hold the testbed's nodes for the tests after it."""
    records = journal_records(sweep_dir)
    if not records or records[0]["kind"] != "sweep":
        return
    prefix = f"{records[0].get('name')}.{records[0]['id']}."
    for cluster in ("alpha", "beta"):
        out = slurm(testbed, cluster, "squeue", "-h", "-o", "%i|%j", check=False)
        ids = [i for i, _, name in (line.partition("|") for line in out.splitlines())
               if name.startswith(prefix)]  # fmt: skip
        if ids:
            slurm(testbed, cluster, "scancel", *ids, check=False)
            # gone from the queue, so they count against no limit of the next test's sweep
            deadline = time.monotonic() + 30
            while (
                time.monotonic() < deadline
                and slurm(
                    testbed, cluster, "squeue", "-h", "-j", ",".join(ids), "-o", "%i", check=False
                ).strip()
            ):
                time.sleep(0.5)
