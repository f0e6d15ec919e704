"""Time-to-result placement against the policies before it, on simulated clusters shaped like
the team's four, under the same background traces.

    python bench/placement.py [--shape limits|partitions|maintenance] [--jobs 24]
                              [--seeds 0,1,2] [--speed 0] [--parallel 2]

Runs `train.py -m data.seed=range(0,N)` (the default preset: 4,000 steps, one node of 8 GPUs
per job) through the real multicluster launcher three times per seed, each against four
simulated Slurm clusters (lingua_sweep/sweep/simulator.py) with the same other users' traces,
in one of three shapes (`--shape`):

| cluster | priority | GPUs | limits: nodes, others' load, our MaxJobsPerUser | partitions |
|---|---|---|---|---|
| research-secure-sim | 1 | 8x H100 | 16, 95%, 4 | 4, 60% |
| mk-turbo-sim | 2 | 8x H100 | 4, 70%, 1 | 1, 50% |
| sphinx-sim | 3 | 8x A100 (1.5x slower) | 8, 40%, 2 | 2, 30% |
| miso-sim | 4 | 8x H200 (1.2x faster) | 4, 60%, 1 | 1, 50% |

`limits`: large shared clusters where the user's limit (the spec's max nodes) binds first;
`partitions`: the spec's node counts as partitions shared with lab mates, no per-user limit,
so a busy partition's queue (and Slurm's estimate of it) decides (partitions: nodes, others'
load); `maintenance`: `limits` with a three-hour maintenance reservation on all of
research-secure-sim's nodes, beginning 30-90 minutes into the sweep (by seed): its nodes are
idle to sinfo before it, yet a job starts there only if its time limit (60 minutes) ends before
the reservation begins. A job runs ~700 s on an H100 node (the seed's 8xH100 figure), 1.5x that
on A100s, 0.83x on H200s (lognormal spread 10%); others ask for 3x their mean run time as a
limit, so Slurm's estimates are late, as on a real cluster. Policies:
- `priority-first-idle`: the seed's launch.py: the first cluster in priority order with an idle
  node, else research-secure-sim's queue; never moves (`placement=priority max_pending_s=null`).
- `dispatcher`: what the launcher did before (`placement=priority`, a job pending 600 s moves
  where there is room).
- `time-to-result`: `placement=time_to_result` (the default).
Prints per policy, mean over seeds: makespan, mean job completion time, GPU-hours used, moves
per job; for time-to-result, the median start-prediction error against Slurm's own estimate's
(jobs placed into a queue; Slurm's is its first `squeue --start` for the job, else the
`sbatch --test-only` answer the placement saw). All times in simulated seconds. Two references,
neither a policy: the makespan were the clusters ours alone (no policy beats it), and that of the
best split of the jobs over the clusters made knowing the other users' whole traces
(`clairvoyant`: a policy that does not know the future rarely comes near it).

The launcher runs on virtual time (`simulated.clock: virtual`): a run repeats itself exactly and
takes seconds of CPU, so `--parallel` beyond the machine's cores buys nothing. `--speed N` runs
it on the real clock instead, N simulated seconds per second (the rounds before the seventh).
"""

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from lingua_sweep.gpus import gpu_spec  # noqa: E402
from lingua_sweep.sweep import predictions  # noqa: E402
from lingua_sweep.sweep.journal import Journal  # noqa: E402
from lingua_sweep.sweep.sim_jobs import SimJob  # noqa: E402
from lingua_sweep.sweep.simulator import SimCluster, SimSpec  # noqa: E402

H100_RUN_S = 700.0
WARMUP_S = 7200.0  # the other users' trace runs this long before the sweep arrives
TIMEOUT_MIN = 60  # our jobs' time limit
SHAPES = {  # name: (priority, gpu type, run-time factor, nodes, others' load, our job limit)
    # Large shared clusters where a per-user limit (the spec's max nodes) binds first.
    "limits": {
        "research-secure-sim": (1, "H100", 1.0, 16, 0.95, 4),
        "mk-turbo-sim": (2, "H100", 1.0, 4, 0.7, 1),
        "sphinx-sim": (3, "A100", 1.5, 8, 0.4, 2),
        "miso-sim": (4, "H200", 0.83, 4, 0.6, 1),
    },
    # The spec's node counts as partitions shared with lab mates, no per-user limit: a busy
    # partition's queue (and Slurm's estimate of it) is what decides.
    "partitions": {
        "research-secure-sim": (1, "H100", 1.0, 4, 0.6, None),
        "mk-turbo-sim": (2, "H100", 1.0, 1, 0.5, None),
        "sphinx-sim": (3, "A100", 1.5, 2, 0.3, None),
        "miso-sim": (4, "H200", 0.83, 1, 0.5, None),
    },
}
# The `limits` clusters with research-secure-sim's maintenance announced in Slurm as a
# reservation on all its nodes: beginning 30-90 minutes into the sweep (by seed), for three
# hours. Its nodes drain to idle before it (nobody's time limit fits), so sinfo shows room there.
SHAPES["maintenance"] = SHAPES["limits"]
MAINTENANCE = {"maintenance": ("research-secure-sim", (1800.0, 5400.0), 10800.0)}
POLICIES = {
    "priority-first-idle": [
        "hydra.launcher.placement=priority",
        "hydra.launcher.max_pending_s=null",
    ],  # fmt: skip
    # Both keep the launcher's default safety net, max_pending_s (600 s), scaled below.
    "dispatcher": ["hydra.launcher.placement=priority"],
    "time-to-result": ["hydra.launcher.placement=time_to_result"],
}
GPUS = 8


def sim_spec(shape: str, name: str, seed: int, speed: float) -> dict:
    """The simulated cluster `name` of a shape, with the other users' trace of a seed."""
    k = list(SHAPES[shape]).index(name)
    _, _, factor, nodes, load, limit = SHAPES[shape][name]
    spec = {"nodes": nodes, "gpus_per_node": GPUS, "cpus_per_node": 64,
            "duration_s": H100_RUN_S * factor, "duration_sigma": 0.1,
            "background_load": load, "background_gpus": GPUS,
            "background_duration_s": 1800.0, "background_limit_factor": 3.0,
            "warmup_s": WARMUP_S, "max_jobs": limit, "speed": speed or 1.0,
            "seed": 1000 * seed + k}  # fmt: skip
    if not speed:
        spec["clock"] = "virtual"
    if MAINTENANCE.get(shape, (None,))[0] == name:
        _, (earliest, latest), duration = MAINTENANCE[shape]
        start = random.Random(seed).uniform(earliest, latest)
        spec["reservations"] = [{"start_s": start, "duration_s": duration}]
    return spec


def write_clusters(conf: Path, root: Path, seed: int, speed: float, shape: str) -> None:
    """speed 0: virtual time (the launcher's clock is the simulation's); else simulated
    seconds per real second."""
    (conf / "cluster").mkdir(parents=True, exist_ok=True)
    data = root / "data" / "fineweb_edu_10bt_shuffled"  # checked before submitting; never read
    data.mkdir(parents=True, exist_ok=True)
    for name in ("fineweb_edu_10bt.chunk.00.jsonl", "fineweb_edu_10bt.val.jsonl"):
        (data / name).write_text('{"text": "a simulated job reads nothing"}\n')
    for name, (prio, gpu, _, nodes, _, _) in SHAPES[shape].items():
        spec = sim_spec(shape, name, seed, speed)
        # What the trainer achieves there, in simulated time per second of the launcher's clock.
        flops = gpu_spec(gpu).model_flops_per_s * (speed or 1.0)
        cluster = {"name": name, "provider": "simulated", "gpus_per_node": GPUS,
                   "gpu_type": gpu, "priority": prio, "max_nodes": nodes,
                   "model_flops_per_s": flops,
                   "data_root": str(root / "data"), "output_root": str(root / "out"),
                   "simulated": spec}  # fmt: skip
        (conf / "cluster" / f"{name}.yaml").write_text(yaml.safe_dump(cluster))


def run_policy(policy: str, seed: int, jobs: int, speed: float, tmp: Path, shape: str) -> dict:
    conf = tmp / f"conf-{shape}-{seed}-{policy}"
    write_clusters(conf, tmp, seed, speed, shape)
    sweep = tmp / f"sweep-{shape}-{seed}-{policy}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_"))}
    env["PYTHONHASHSEED"] = "0"  # the same iteration order of names, run after run
    scale = speed or 1.0  # the launcher's intervals shrink with a real clock's speed-up
    extra = list(POLICIES[policy])
    if policy != "priority-first-idle":
        extra.append(f"hydra.launcher.max_pending_s={600 / scale}")
    cmd = [sys.executable, str(REPO / "train.py"), "-m", f"data.seed=range(0,{jobs})",
           "hydra/sweeper=grid", "hydra/launcher=multicluster",
           f"hydra.launcher.clusters=[{','.join(SHAPES[shape])}]",
           f"hydra.launcher.poll_interval_s={5 / scale}",
           f"hydra.launcher.probe_every_s={30 / scale}", "hydra.launcher.live=false",
           f"hydra.launcher.timeout_min={TIMEOUT_MIN}", "logging.wandb=null",
           f"hydra.searchpath=[file://{conf}]", f"hydra.sweep.dir={sweep}", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{policy} seed {seed} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    state = Journal(sweep).replay()
    entries = list(state.jobs.values())
    registered = {r["index"]: r["t"] for r in Journal(sweep).records() if r["kind"] == "job"}
    t0 = min(registered.values())
    ended = [j.ended_at for j in entries if j.ended_at]
    ran = [(j.ended_at - j.started_at) for j in entries if j.started_at and j.ended_at]
    errors = {name: {k: v * scale if k.endswith("_s") and v is not None else v
                     for k, v in row.items()}
              for name, row in predictions.prediction_errors(entries).items()}  # fmt: skip
    start_err, slurm_err = [], []
    for j in entries:  # jobs placed into a queue, where Slurm gave an estimate
        plan = j.planned
        if plan and plan.get("slurm_start") and j.started_at and plan["cluster"] == j.cluster:
            start_err.append(abs(j.started_at - plan["start"]) * scale)
            slurm_err.append(abs(j.started_at - predictions.slurm_estimate(plan)) * scale)
    where: dict[str, int] = {}
    for j in entries:
        where[j.cluster] = where.get(j.cluster, 0) + 1
    return {
        "policy": policy, "seed": seed,
        "done": sum(j.state == "COMPLETED" for j in entries),
        "makespan_s": (max(ended) - t0) * scale,
        "mean_jct_s": statistics.mean(j.ended_at - registered[j.index] for j in entries
                                      if j.ended_at) * scale,
        "gpu_hours": sum(ran) * scale * GPUS / 3600,
        "moves_per_job": sum(j.moves for j in entries) / len(entries),
        "start_err_s": statistics.median(start_err) if start_err else None,
        "slurm_err_s": statistics.median(slurm_err) if slurm_err else None,
        "queued_predictions": len(start_err), "where": where, "errors": errors,
    }  # fmt: skip


def clairvoyant(shape: str, seed: int, jobs: int) -> tuple[float, dict[str, int]]:
    """A reference, not a policy: every job queued where it was sent 10 s into the sweep (when
    the launcher's first placement lands), how many on each cluster chosen knowing the other
    users' whole trace there (each of their jobs' arrival and run time), ours at their mean run
    time. The makespan of the best such split, and the split. A policy that moves jobs as nodes
    free may beat it; one that does not know the future rarely comes near it.

    With same-sized jobs started first-fit in queue order, a job of ours never waits for one
    queued behind it: one run per cluster with every job queued gives when its first k end."""
    ends: dict[str, list[float]] = {}
    for name, (_, _, factor, *_) in SHAPES[shape].items():
        spec = {k: v for k, v in sim_spec(shape, name, seed, 0.0).items() if k != "clock"}
        cluster, t = SimCluster(name, SimSpec(**spec)), WARMUP_S + 10.0
        cluster.advance(t)
        ours = [SimJob(id=f"ours{k}", name="x", user="me", gpus=GPUS, cpus=1, nodes=1,
                       duration=H100_RUN_S * factor, submitted=0.0,
                       time_limit=TIMEOUT_MIN * 60.0) for k in range(jobs)]  # fmt: skip
        for job in ours:
            cluster.enqueue(job)
        while any(job.end is None for job in ours) and t < WARMUP_S + 86400:
            t += 5.0
            cluster.advance(t)
        done = [math.inf if job.end is None else job.end - WARMUP_S for job in ours]
        ends[name] = [0.0] + [max(done[: k + 1]) for k in range(jobs)]
    for makespan in sorted({e for row in ends.values() for e in row}):
        split = {n: max(k for k, e in enumerate(row) if e <= makespan) for n, row in ends.items()}
        if sum(split.values()) >= jobs:
            return makespan, split
    return math.inf, {}


def makespan_bound(shape: str, jobs: int) -> float:
    """The sweep's makespan were the clusters ours alone: every node free at the start, our
    limits kept, each job at its mean run time, each taking the slot that finishes it first.
    No policy beats it; other users' load only adds."""
    slots = [(0.0, H100_RUN_S * factor)
             for _, _, factor, nodes, _, limit in SHAPES[shape].values()
             for _ in range(min(nodes, limit or nodes))]  # fmt: skip
    ends = []
    for _ in range(jobs):
        k = min(range(len(slots)), key=lambda i: sum(slots[i]))
        slots[k] = (sum(slots[k]), slots[k][1])
        ends.append(slots[k][0])
    return max(ends)


def mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.mean(values) if values else None


def table(rows: list[dict], foresight: float) -> str:
    lines = ["| policy | makespan s | mean JCT s | GPU-hours | moves/job | start error s "
             "(Slurm's) | jobs per cluster |", "|" + "---|" * 7]  # fmt: skip
    base = {}
    for policy in POLICIES:
        mine = [r for r in rows if r["policy"] == policy]
        if not mine:
            continue
        base[policy] = mean(mine, "makespan_s")
        where: dict[str, int] = {}
        for r in mine:
            for k, v in r["where"].items():
                where[k] = where.get(k, 0) + v
        start, slurm = mean(mine, "start_err_s"), mean(mine, "slurm_err_s")
        err = f"{start:.0f} ({slurm:.0f})" if start is not None and slurm is not None else "-"
        lines.append(
            f"| {policy} | {base[policy]:.0f} | {mean(mine, 'mean_jct_s'):.0f} | "
            f"{mean(mine, 'gpu_hours'):.2f} | {mean(mine, 'moves_per_job'):.2f} | {err} | "
            + ", ".join(f"{k} {v}" for k, v in sorted(where.items()))
            + " |"
        )
    ttr = base.get("time-to-result")
    if None in (ttr, base.get("priority-first-idle"), base.get("dispatcher")):
        return "\n".join(lines)
    lines.append("")
    lines.append(f"time-to-result makespan: {ttr / base['priority-first-idle']:.3f}x "
                 f"priority-first-idle, {ttr / base['dispatcher']:.3f}x dispatcher; the "
                 f"clairvoyant split is {foresight / base['dispatcher']:.3f}x the dispatcher, "
                 f"time-to-result {ttr / foresight:.3f}x the clairvoyant split")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--speed",
        type=float,
        default=0.0,
        help="simulated s per real s; 0: virtual time (repeatable, CPU-bound)",
    )
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--shape", choices=SHAPES, default="limits")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = [(policy, int(seed)) for seed in args.seeds.split(",")
            for policy in args.policies.split(",")]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lingua_bench_placement_") as tmp:

        def run(policy_seed: tuple[str, int]) -> dict:
            policy, seed = policy_seed
            row = run_policy(policy, seed, args.jobs, args.speed, Path(tmp), args.shape)
            print(json.dumps(row), file=sys.stderr, flush=True)
            return row

        # Each run is its own process, with its own clusters and clock.
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            rows = list(pool.map(run, runs))
    bound = makespan_bound(args.shape, args.jobs)
    seeds = sorted({seed for _, seed in runs})
    foresight = statistics.mean(clairvoyant(args.shape, seed, args.jobs)[0] for seed in seeds)
    text = (f"shape: {args.shape}, {args.jobs} jobs, seeds {args.seeds}; makespan were the "
            f"clusters ours alone: {bound:.0f} s; of the best split made knowing the other "
            f"users' traces (clairvoyant, mean): {foresight:.0f} s\n\n"
            + table(rows, foresight))  # fmt: skip
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
