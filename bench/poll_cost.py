"""What watching a sweep costs the clusters: ssh connections and sacct calls per poll cycle.

    python bench/poll_cost.py [--jobs 200] [--sleep 20]

Runs a `--jobs`-job sweep of a no-op Hydra app (tests/apps/rank_app.py, each job sleeps
`--sleep` s) through `hydra/launcher=multicluster` over the testbed's two clusters (alpha in
this process's Slurm, beta over ssh). Real wrappers, first on PATH, log every `squeue`, `sacct`
and `ssh` the launcher (and, on beta's login node, the agent) runs; beta's sshd log counts the
authenticated TCP connections. A poll of a cluster is one `squeue` (the agent asks squeue first),
so per cluster: sacct calls / squeue calls is the sacct calls per poll (target <= 1), and
new connections vs. ssh invocations shows the multiplexing (target: a handful per sweep, not
one per call). Also: the launcher's CPU seconds (with its children) per job.
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import slurm_testbed  # noqa: E402 - tests/ holds the testbed module

WRAPPED = ("squeue", "sacct", "ssh")


def write_wrappers(bin_dir: Path, log: Path) -> None:
    """`<tool>` that appends `<tool> <args>` to log, then runs the real one."""
    bin_dir.mkdir(parents=True)
    for tool in WRAPPED:
        real = shutil.which(tool)
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexec {real} "$@"\n')
        wrapper.chmod(0o755)


def count(log: Path, tool: str, where: str | None = None) -> int:
    if not log.exists():
        return 0
    lines = [line for line in log.read_text().splitlines() if line.startswith(f"{tool} ")]
    return len([line for line in lines if where is None or where in line])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--sleep", type=float, default=20.0, help="seconds each job sleeps")
    parser.add_argument("--poll", type=float, default=2.0, help="hydra.launcher.poll_interval_s")
    args = parser.parse_args()

    was_running = slurm_testbed.is_running()
    testbed = slurm_testbed.start()
    try:
        with tempfile.TemporaryDirectory(prefix="lingua_bench_poll_") as tmp:
            tmp = Path(tmp)
            here_log, beta_log = tmp / "here.log", tmp / "beta.log"
            write_wrappers(tmp / "bin", here_log)
            write_wrappers(tmp / "beta-bin", beta_log)
            conf = tmp / "conf"
            shutil.copytree(testbed.conf_dir, conf)
            beta_yaml = conf / "cluster" / "beta.yaml"
            beta = yaml.safe_load(beta_yaml.read_text())
            beta["env"] = {"PATH": f"{tmp / 'beta-bin'}:/usr/local/bin:/usr/bin:/bin"}
            beta_yaml.write_text(yaml.safe_dump(beta))
            sshd_log = testbed.state_dir / "logs" / "sshd.log"
            accepted_before = sshd_log.read_text().count("Accepted ") if sshd_log.exists() else 0

            env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_"))}
            env["PATH"] = f"{tmp / 'bin'}:{env['PATH']}"
            env["LINGUA_SWEEP_SSH_DIR"] = str(tmp / "ssh")
            cmd = [
                sys.executable, str(REPO / "tests" / "apps" / "rank_app.py"), "-m",
                f"value=range(0,{args.jobs})", f"sleep_s={args.sleep}",
                "hydra/launcher=multicluster", "hydra.launcher.clusters=[alpha,beta]",
                f"hydra.searchpath=[file://{conf}]", f"hydra.sweep.dir={tmp / 'sweep'}",
                f"hydra.launcher.poll_interval_s={args.poll}", "hydra.launcher.live=false",
            ]  # fmt: skip
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.monotonic()
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
            wall = time.monotonic() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            accepted = sshd_log.read_text().count("Accepted ") - accepted_before

            polls_alpha = count(here_log, "squeue")
            polls_beta = count(beta_log, "squeue")
            print(
                f"{args.jobs} no-op jobs ({args.sleep:g} s each) over alpha + beta in {wall:.0f} s"
            )
            print(
                f"alpha (in-process): {polls_alpha} polls, {count(here_log, 'sacct')} sacct "
                f"-> {count(here_log, 'sacct') / max(polls_alpha, 1):.2f} sacct per poll"
            )
            print(
                f"beta  (over ssh):   {polls_beta} polls, {count(beta_log, 'sacct')} sacct "
                f"-> {count(beta_log, 'sacct') / max(polls_beta, 1):.2f} sacct per poll"
            )
            ssh_calls = count(here_log, "ssh")
            print(
                f"ssh: {ssh_calls} invocations over {accepted} authenticated connection(s) "
                f"-> {ssh_calls / max(polls_beta, 1):.1f} invocations per beta poll"
            )
            print(
                f"launcher CPU (with its children): {cpu:.1f} s = {cpu / args.jobs:.3f} s per job"
            )
    finally:
        if not was_running:
            testbed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
