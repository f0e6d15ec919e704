"""What a sweep of thousands of jobs costs the launcher, on simulated clusters (or the testbed).

    python bench/scale.py [--jobs 10000] [--poll 1] [--out results/scale.md]
    python bench/scale.py --jobs 1000,10000,100000
    python bench/scale.py --where testbed --jobs 2000

Runs `tests/apps/rank_app.py -m value=range(0,N) hydra/sweeper=grid hydra/launcher=multicluster`
(one-GPU jobs, eight to a node) in a process of its own, against two simulated Slurm clusters
(lingua_sweep/sweep/simulator.py: 64 and 32 nodes of 8 GPUs, jobs of ~2 s at the bench's
speed, 1% failures, 1% preemptions, a second of sacct lag, another user keeping 20% of the GPUs
busy, at most 5,000 jobs of the user in each queue, as a QOS's MaxSubmitJobsPerUser), or the
real testbed (1-second jobs). Prints, per N: the launcher's CPU per job with its children
(the simulator's own CPU, which it counts, taken out; in brackets the controller alone, from
its start, without Python's start-up and the agent processes), its peak RSS, the loop's cycle
time p50/p99,
the controller's own delay from a job queued (registered, or back after a preemption) to its
sbatch, and the wall time of `lingua-sweep status`, `lingua-sweep results` and of
replaying the journal as a resumed launcher does.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "apps" / "rank_app.py"
LINGUA_SWEEP = Path(sys.executable).with_name("lingua-sweep")
SIMULATED = {
    "sim-a": {"nodes": 64, "priority": 1, "background_load": 0.2},
    "sim-b": {"nodes": 32, "priority": 2, "background_load": 0.2},
}
SPEED = 300.0  # simulated seconds per real second: a 600 s job takes 2 s


def write_clusters(conf: Path, root: Path) -> None:
    (conf / "cluster").mkdir(parents=True)
    for name, shape in SIMULATED.items():
        spec = {"nodes": shape["nodes"], "gpus_per_node": 8, "cpus_per_node": 64,
                "duration_s": 600.0, "duration_sigma": 0.25, "fail_rate": 0.01,
                "preempt_rate": 0.01, "visibility_lag_s": 1.0, "max_submit": 5000,
                "background_load": shape["background_load"], "background_duration_s": 1800.0,
                "speed": SPEED, "seed": shape["priority"]}  # fmt: skip
        cluster = {"name": name, "provider": "simulated", "gpus_per_node": 8,
                   "gpu_type": "h100", "priority": shape["priority"],
                   "data_root": str(root / "data"), "output_root": str(root / "out"),
                   "simulated": spec}  # fmt: skip
        (conf / "cluster" / f"{name}.yaml").write_text(yaml.safe_dump(cluster))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def timed(argv: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv[:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.monotonic() - start, proc


def run_one(jobs: int, poll: float, tmp: Path, clusters: list[str], conf: Path,
            job_args: list[str], check: bool) -> dict:  # fmt: skip
    sweep = tmp / f"sweep-{jobs}"
    profile = tmp / f"profile-{jobs}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_"))}
    env["LINGUA_SWEEP_PROFILE"] = str(profile)
    cmd = [
        sys.executable, str(APP), "-m", f"value=range(0,{jobs})", *job_args, "hydra/sweeper=grid",
        "hydra/launcher=multicluster", f"hydra.launcher.clusters=[{','.join(clusters)}]",
        f"hydra.launcher.poll_interval_s={poll}",
        "hydra.launcher.probe_every_s=5", "hydra.launcher.live=false",
        f"hydra.searchpath=[file://{conf}]", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, proc = timed(cmd, cwd=tmp, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    report = json.loads(profile.read_text()) if profile.exists() else {"cycle_s": []}
    sim_cpu = sum(s["cpu_s"] for s in report.get("simulated", {}).values())
    status_s, _ = timed([str(LINGUA_SWEEP), "status", str(sweep)], env=env)
    results_s, res = timed([str(LINGUA_SWEEP), "results", str(sweep), "--format", "csv"],
                           env=env)  # fmt: skip
    replay = (
        "import sys, time; from lingua_sweep.sweep import verbs; t = time.perf_counter(); "
        "c = verbs.controller_from_journal(sys.argv[1]); print(time.perf_counter() - t)"
    )
    _, rep = timed([sys.executable, "-c", replay, str(sweep)], env=env)
    records = [json.loads(line) for line in (sweep / "journal.jsonl").read_text().splitlines()]
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    counts: dict[str, int] = {}
    for r in records:
        if r["kind"] == "result":
            counts[r["status"]] = counts.get(r["status"], 0) + 1
    # The controller's own delay: from a job being queued here (registered, or back after a
    # preemption) to its sbatch, for jobs that had room (not waiting on a limit or a full
    # cluster: with when_busy=queue every job is sent at once, up to the submit limit).
    queued_at: dict[int, float] = {}
    to_sbatch = []
    for r in records:
        if r["kind"] == "job" or r["kind"] in ("resubmit", "moved", "unsubmitted"):
            for i in r.get("indices") or [r["index"]]:
                queued_at[i] = r["t"]
        elif r["kind"] == "intent":
            to_sbatch += [r["t"] - queued_at.pop(i) for i in r["indices"] if i in queued_at]
    checked = None
    if check:  # every job once in sacct, the journal true to Slurm (`lingua-sweep check`)
        checked = timed([str(LINGUA_SWEEP), "check", str(sweep)], env=env)[1].stdout.strip()
    return {
        "jobs": jobs, "wall_s": wall, "exit": proc.returncode, "cpu_s": cpu, "sim_cpu_s": sim_cpu,
        "launcher_ms_per_job": 1000 * (cpu - sim_cpu) / jobs,
        # The launcher process alone, from the controller's start: no Python start-up, no agent
        # processes (a local Slurm's agent runs here as a child; a remote one on its login node).
        "controller_ms_per_job": 1000 * (report.get("launch_cpu_s", 0.0) - sim_cpu) / jobs,
        # The launcher's own peak (RUSAGE_CHILDREN's is the largest child's so far).
        "peak_rss_mb": report.get("peak_rss_mb", after.ru_maxrss / 1024),
        "cycles": len(report["cycle_s"]),
        "cycle_p50_s": percentile(report["cycle_s"], 0.5),
        "cycle_p99_s": percentile(report["cycle_s"], 0.99),
        "slowest_cycles": sorted(((round(t, 3), i) for i, t in enumerate(report["cycle_s"])),
                                 reverse=True)[:5],
        "to_sbatch_p50_s": percentile(to_sbatch, 0.5),
        "to_sbatch_p99_s": percentile(to_sbatch, 0.99),
        "status_s": status_s, "results_s": results_s, "replay_s": float(rep.stdout.strip() or 0),
        "results_rows": max(0, len(res.stdout.strip().splitlines()) - 1),
        "states": counts, "check": checked,
        "per_job": {"polls": sum(report.get("polls", {}).values()) / jobs,
                    "submissions": kinds.get("intent", 0) / jobs,
                    "state_changes": kinds.get("state", 0) / jobs,
                    "resubmits": kinds.get("resubmit", 0) / jobs},
        "simulated": report.get("simulated", {}),
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    head = ("| jobs | wall s | launcher CPU ms/job (controller alone) | peak RSS MB | "
            "cycle p50 / p99 s | queued->sbatch p50 / p99 s | status s | results s | replay s | "
            "polls / submissions / state changes per job | states |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(r["states"].items()))
        per = r["per_job"]
        lines.append(
            f"| {r['jobs']} | {r['wall_s']:.0f} | {r['launcher_ms_per_job']:.2f} "
            f"({r['controller_ms_per_job']:.2f}) | "
            f"{r['peak_rss_mb']:.0f} | {r['cycle_p50_s']:.3f} / {r['cycle_p99_s']:.3f} | "
            f"{r['to_sbatch_p50_s']:.2f} / {r['to_sbatch_p99_s']:.2f} | {r['status_s']:.2f} | "
            f"{r['results_s']:.2f} | {r['replay_s']:.2f} | {per['polls']:.3f} / "
            f"{per['submissions']:.3f} / {per['state_changes']:.2f} | {states} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default="10000", help="comma-separated sweep sizes")
    parser.add_argument("--poll", type=float, default=1.0, help="hydra.launcher.poll_interval_s")
    parser.add_argument(
        "--where",
        choices=("simulator", "testbed", "testbed-sim"),
        default="simulator",
        help="testbed-sim: a simulator shaped like the testbed (calibration)",
    )
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    context, job_args = None, ["hydra.launcher.gpus_per_node=1"]
    if args.where != "simulator":
        import scale_testbed  # bench/scale_testbed.py

        job_args = scale_testbed.JOB_ARGS
        context = (scale_testbed.Testbed() if args.where == "testbed"
                   else scale_testbed.TestbedShapedSimulator())  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="lingua_bench_scale_") as tmp:
        tmp = Path(tmp)
        conf = tmp / "conf"
        if context is None:
            write_clusters(conf, tmp)
            clusters = list(SIMULATED)
        else:
            clusters = context.enter(conf, tmp)
        try:
            for jobs in [int(n) for n in args.jobs.split(",")]:
                row = run_one(jobs, args.poll, tmp, clusters, conf, job_args,
                              check=args.where == "testbed")  # fmt: skip
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
        finally:
            if context is not None:
                context.exit()
    text = table(rows)
    print(text)
    for before, r in zip(rows, rows[1:], strict=False):  # each size against the one before
        ratio = r["launcher_ms_per_job"] / before["launcher_ms_per_job"]
        alone = r["controller_ms_per_job"] / before["controller_ms_per_job"]
        print(f"CPU per job at {r['jobs']} / at {before['jobs']}: {ratio:.2f}x "
              f"(controller alone {alone:.2f}x)")  # fmt: skip
    if args.out:
        args.out.write_text(f"# bench/scale.py --where {args.where}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
