"""How long the `multicluster` launcher takes to submit a sweep, against stock `submitit_slurm`.

    python bench/submit.py [--jobs 64] [--repeats 3]

Both sides submit the same --jobs-job sweep (`experiment=debug`, distinct `optim.lr` values) to
cluster alpha of the Slurm testbed (tests/slurm_testbed.py, started here if it is not running and
stopped at the end only then):

- multicluster: `hydra/launcher=multicluster hydra.launcher.clusters=[alpha]`;
- stock:        `hydra/launcher=submitit_slurm hydra.launcher.partition=batch`.

Both get the same environment (alpha's SLURM_CONF) and the same overrides (`cluster=alpha`, the
testbed's Hydra searchpath, a sweep dir in a temp dir that is also the cwd).

"Submitting" is timed from starting `python train.py -m ...` until all jobs of that sweep are
visible in alpha's queue (`squeue -r`, by the sweep's unique job name). So that the jobs cannot
start (we time submission, not training), every alpha node is first held by an exclusive
`sleep 3600` job; the multicluster launcher then finds no idle node and queues everything on
alpha (its `when_busy=queue` default). After each measurement the sweep process group is killed,
its jobs are cancelled and the bench waits for the queue to be clean; the holders are cancelled
at the end. The sides alternate which goes first; each time, the medians and the ratio
multicluster / stock (target <= 1.2) are printed.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import slurm_testbed  # noqa: E402 - tests/ holds the testbed module

MEASURE_TIMEOUT_S = 300  # one sweep submission, start to all jobs queued
CLEAN_TIMEOUT_S = 60  # cancelled jobs leaving the queue; holders starting
POLL_S = 0.1
SIDES = ("multicluster", "stock")


def slurm(args: list[str], env: dict[str, str], check: bool = True) -> str:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` exited with {proc.returncode}: {proc.stderr}")
    return proc.stdout


def queued(job_name: str, env: dict[str, str]) -> set[str]:
    """Ids of the sweep's jobs in alpha's queue (their Slurm name is job_name or starts with
    `job_name.`); array tasks one by one (`-r`)."""
    out = slurm(["squeue", "-h", "-r", "--format=%i %j"], env, check=False)
    return {
        job_id for job_id, _, name in (line.partition(" ") for line in out.splitlines())
        if name == job_name or name.startswith(f"{job_name}.")
    }  # fmt: skip


def wait_for(what: str, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def hold_nodes(env: dict[str, str], name: str) -> list[str]:
    """One exclusive sleeper per alpha node; returns once they all run."""
    nodes = slurm(["sinfo", "-h", "-N", "-p", "batch", "--format=%N"], env).split()
    ids = [
        slurm(
            ["sbatch", "--parsable", "-p", "batch", "-N1", "--exclusive", f"--job-name={name}",
             "--output=/dev/null", "--wrap", "sleep 3600"],
            env,
        ).strip()
        for _ in nodes
    ]  # fmt: skip

    def all_running() -> bool:
        out = slurm(["squeue", "-h", f"--jobs={','.join(ids)}", "--format=%T"], env, check=False)
        return out.split() == ["RUNNING"] * len(ids)

    wait_for(f"the node holders {ids} to run", all_running, CLEAN_TIMEOUT_S)
    return ids


def sweep_command(side: str, jobs: int, name: str, conf_dir: Path, sweep_dir: Path) -> list[str]:
    lrs = ",".join(f"{(i + 1) * 1e-5:.5g}" for i in range(jobs))
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "experiment=debug",
        "cluster=alpha",
        f"name={name}",
        f"optim.lr={lrs}",
        f"hydra.searchpath=[file://{conf_dir}]",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    if side == "multicluster":
        return [*cmd, "hydra/launcher=multicluster", "hydra.launcher.clusters=[alpha]",
                "hydra.launcher.live=false"]  # fmt: skip
    return [
        *cmd,
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=batch",
        f"hydra.launcher.name={name}",
    ]


def job_name(side: str, name: str) -> str:
    """The Slurm job name each launcher gives the sweep's jobs (multicluster: a prefix of
    `<name>.<sweep id>.<submission>`)."""
    return name


def stop_group(proc: subprocess.Popen) -> None:
    """Ends the sweep process and its children (their own process group, proc.pid)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def measure(side: str, jobs: int, name: str, tmp: Path, testbed, env: dict[str, str]) -> float:
    """Seconds from starting the sweep until its `jobs` jobs are all in alpha's queue."""
    cmd = sweep_command(side, jobs, name, testbed.conf_dir, tmp / "sweeps" / name)
    slurm_name = job_name(side, name)
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        while True:
            n = len(queued(slurm_name, env))
            elapsed = time.monotonic() - start
            if n >= jobs:
                return elapsed
            problem = None
            if proc.poll() is not None:
                problem = f"exited with {proc.returncode} with {n}/{jobs} jobs queued"
            elif elapsed > MEASURE_TIMEOUT_S:
                problem = f"still has {n}/{jobs} jobs queued after {MEASURE_TIMEOUT_S}s"
            if problem:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"{side} sweep {problem}:\n{tail}")
            time.sleep(POLL_S)
    finally:
        stop_group(proc)
        ids = queued(slurm_name, env)
        if ids:
            slurm(["scancel", *ids], env, check=False)
        wait_for(f"{slurm_name} to leave the queue", lambda: not queued(slurm_name, env),
                 CLEAN_TIMEOUT_S)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=64, help="jobs per sweep")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per side")
    args = parser.parse_args()

    was_running = slurm_testbed.is_running()
    testbed = slurm_testbed.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_", "WANDB_"))}
    env["SLURM_CONF"] = str(testbed.alpha_slurm_conf)
    env["WANDB_MODE"] = "disabled"
    tag = f"lsbench{os.getpid()}"
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    holders: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="lingua_bench_submit_") as tmp:
            holders = hold_nodes(env, f"{tag}_hold")
            print(f"holding alpha's nodes with jobs {', '.join(holders)}", flush=True)
            for rep in range(args.repeats):
                order = SIDES if rep % 2 == 0 else SIDES[::-1]
                for side in order:
                    name = f"{tag}_{side}{rep}"
                    seconds = measure(side, args.jobs, name, Path(tmp), testbed, env)
                    times[side].append(seconds)
                    print(f"repeat {rep}: {side:12s} {args.jobs} jobs queued in {seconds:6.2f}s",
                          flush=True)  # fmt: skip
    finally:
        if holders:
            slurm(["scancel", *holders], env, check=False)
        if not was_running:
            testbed.stop()

    medians = {side: statistics.median(ts) for side, ts in times.items()}
    for side in SIDES:
        each = ", ".join(f"{t:.2f}" for t in times[side])
        print(f"{side:12s} median {medians[side]:6.2f}s  ({each})")
    ratio = medians["multicluster"] / medians["stock"]
    print(f"ratio multicluster / stock: {ratio:.2f}  (target <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
