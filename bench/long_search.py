"""A long async Optuna search over both testbed clusters, interrupted twice, that must end true.

    .venv/bin/python bench/long_search.py [--trials 48] [--n-jobs 8] [--out results/]

as root (it runs the Slurm testbed). The trainer (tiny model) with the median pruner searches
the learning rate on alpha and beta (4 CPUs a job: 4 at a time on each, so n_jobs=8 uses
both); the launcher is killed with SIGKILL once and stopped with Ctrl-C once, each time when
some trials have finished, and rerun with the same command. At the
end: exactly `--trials` trials counted in the study (stopped ones aside), none RUNNING,
`lingua-sweep check` clean. Writes <out>/long_search.md (the results table, the figures) and
<out>/long_search_dashboard.png (the study in headless Chromium via `lingua-sweep dashboard`).
"""

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import slurm_testbed  # noqa: E402
from sweep_helpers import LINGUA_SWEEP, TINY, clean_env, journal_records  # noqa: E402


def command(testbed, sweep_dir: Path, trials: int, n_jobs: int) -> list[str]:
    tiny = [o for o in TINY if not o.startswith(("steps=", "logging.val_loss_every="))]
    return [
        sys.executable, str(REPO / "train.py"), "-m", *tiny, "steps=300",
        "logging.val_loss_every=50", "logging.wandb=null", "hydra/launcher=multicluster",
        f"hydra.searchpath=[file://{testbed.conf_dir}]", "hydra.launcher.clusters=[alpha,beta]",
        "hydra.launcher.cpus_per_task=4", "hydra.launcher.poll_interval_s=1",
        "hydra.launcher.probe_every_s=2", 'hydra.launcher.setup=["export OMP_NUM_THREADS=1"]',
        "hydra/sweeper=async_optuna", f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.n_jobs={n_jobs}", "hydra/sweeper/pruner=median",
        "hydra.sweeper.sampler.seed=0", "optim.lr=tag(log,interval(1e-4,3e-2))",
        f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip


def finished(sweep_dir: Path) -> int:
    return sum(r["kind"] == "result" for r in journal_records(sweep_dir))


def interrupt_after(cmd, cwd, sweep_dir: Path, results: int, sig: int) -> tuple[int, float]:
    """Runs the launcher until `results` jobs have ended, then sends `sig`; (exit code, s)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    while proc.poll() is None and finished(sweep_dir) < results:
        time.sleep(0.5)
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=300), time.monotonic() - t0


def screenshot(sweep_dir: Path, out: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([LINGUA_SWEEP, "dashboard", str(sweep_dir), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as r:
                    study_id = json.loads(r.read())["study_summaries"][0]["study_id"]
                break
            except OSError:
                time.sleep(0.5)
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        "--virtual-time-budget=15000", "--window-size=1400,1000",
                        f"--screenshot={out}",
                        f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"],
                       capture_output=True, timeout=120, check=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--n-jobs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "results")
    args = parser.parse_args()
    import optuna

    from lingua_sweep import corpus

    testbed = slurm_testbed.start()
    corpus.install(str(testbed.state_dir / "data"))  # both clusters' data_root
    work = Path(tempfile.mkdtemp(prefix="long-search-"))
    sweep_dir = work / "sweep"
    cmd = command(testbed, sweep_dir, args.trials, args.n_jobs)
    t0 = time.monotonic()
    runs = [interrupt_after(cmd, work, sweep_dir, args.trials // 4, signal.SIGKILL)]
    runs.append(interrupt_after(cmd, work, sweep_dir, args.trials // 2, signal.SIGINT))
    final = subprocess.run(cmd, cwd=work, env=clean_env(), capture_output=True, text=True,
                           timeout=3600)  # fmt: skip
    wall = time.monotonic() - t0
    check = subprocess.run([LINGUA_SWEEP, "check", str(sweep_dir)], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    study = optuna.load_study(study_name="debug", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    trials = study.trials
    stopped = [t for t in trials if t.user_attrs.get("stopped") is True]
    counted = [t for t in trials if t not in stopped]
    states = {s: sum(t.state.name == s for t in counted) for s in ("COMPLETE", "PRUNED", "FAIL")}
    running = sum(t.state.name == "RUNNING" for t in trials)
    table = subprocess.run([LINGUA_SWEEP, "results", str(sweep_dir), "--format", "md"],
                           capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    screenshot(sweep_dir, args.out / "long_search_dashboard.png")
    lines = [
        "# A long async Optuna search, interrupted twice (bench/long_search.py)",
        "",
        f"`{' '.join(cmd[1:])}`".replace(str(sweep_dir), "<sweep dir>").replace(
            str(testbed.conf_dir), "<testbed conf>"),
        "",
        f"- launches: kill -9 after {args.trials // 4} ended jobs (exit {runs[0][0]}, "
        f"{runs[0][1]:.0f} s), Ctrl-C after {args.trials // 2} (exit {runs[1][0]}, "
        f"{runs[1][1]:.0f} s), then to the end (exit {final.returncode}); {wall:.0f} s in all",
        f"- study: {len(counted)} trials counted (n_trials={args.trials}): {states}; "
        f"{len(stopped)} stopped by the interruptions and rerun; {running} RUNNING",
        f"- `lingua-sweep check`: {check.stdout.strip() or check.stderr.strip()}",
        "- the study in the dashboard: [long_search_dashboard.png](long_search_dashboard.png)",
        "",
        table,
    ]  # fmt: skip
    (args.out / "long_search.md").write_text("\n".join(lines))
    print("\n".join(lines[:9]))
    ok = (len(counted) == args.trials and running == 0 and check.returncode == 0
          and final.returncode == 0)  # fmt: skip
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work} for a look", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
