"""Async vs batch-synchronous Optuna through multicluster, and what a median pruner saves.

    python bench/async_sweep.py [--where local|testbed] [--task gpu-like|train] [--jobs 4]
                                [--steps 20,240] [--seeds 0,1,2] [--part all|makespan|pruner]

1. The same 12 trials (seeded random sampler over `steps=choice(...)` and a log-uniform lr, so
   the trials differ a lot in length) with `hydra/sweeper=optuna` (hydra-optuna-sweeper: asks
   n_jobs trials, waits for the slowest, asks again) and with `hydra/sweeper=async_optuna`, per
   seed. Makespan: first submission to last result, from the sweep's journal. Slot utilisation:
   the trials' time on a slot / (n_jobs x makespan). Target: async makespan <= 0.75 x batch.
   With only 12 trials in 4 slots the ratio depends on the draw (where the long trials fall),
   hence several seeds.
2. The same 12 trials with async_optuna, without and with `hydra/sweeper/pruner=median`: the
   trials' slot time ("CPU time": what a cluster bills) and the study's best value.

--task gpu-like (default): a trial is this file's own Hydra app, a stand-in for a job that owns
its GPU: each step takes a fixed `step_s` of wall time (a sleep, no CPU), and it logs `loss/val`
every 10 steps from a fixed curve whose floor depends on the learning rate (best near 3e-3).
On this 2-core dev machine, real CPU training of 4 concurrent trials measures the CPU, not the
scheduling: a trial left alone at the end of a batch runs faster, hiding the idle slots.
--task train runs the real trainer (tiny model, one thread per job) instead.
--where local (default): the `local` cluster, n_jobs processes here. --where testbed: clusters
alpha and beta of the Slurm testbed (tests/slurm_testbed.py, started if needed; other users of
the testbed share its nodes, so there the figures are noisier).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRIALS = 12
TINY = ["experiment=debug", "model.dim=32", "model.n_layers=1", "data.batch_size=4",
        "data.seq_len=64", "logging.freq=10", "logging.val_loss_every=10",
        "logging.wandb=null"]  # fmt: skip


# --- the gpu-like trial: this file run with --app ----------------------------------------------


def app() -> None:
    import hydra
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(
        name="bench_trial", node={"steps": 100, "lr": 1e-3, "step_s": 0.1, "val_every": 10}
    )

    @hydra.main(config_path=None, config_name="bench_trial", version_base="1.3")
    def trial(cfg) -> float:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir) / "metrics.jsonl"
        floor = 2.0 + 0.8 * (math.log10(cfg.lr) - math.log10(3e-3)) ** 2
        loss = 8.0
        with out.open("a") as f:
            for step in range(1, cfg.steps + 1):
                time.sleep(cfg.step_s)
                wiggle = 0.01 * math.sin(step * 7.0 + cfg.lr * 1e4)
                loss = floor + (8.0 - floor) * math.exp(-step / 30) + wiggle
                if step % cfg.val_every == 0 or step == cfg.steps:
                    record = {"step": step, "time": time.time(), "loss/val": loss}
                    f.write(json.dumps(record) + "\n")
                    f.flush()
        return loss

    trial()


# --- the bench ---------------------------------------------------------------------------------


def sweep_command(args, seed: int, sweep_dir: Path, sweeper: str, *extra: str) -> list[str]:
    if args.task == "train":
        cmd = [sys.executable, str(REPO / "train.py"), "-m", *TINY]
        lr = "optim.lr=tag(log,interval(1e-4,1e-1))"
    else:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--app",
            "-m",
            f"step_s={args.step_s}",
        ]
        lr = "lr=tag(log,interval(1e-4,1e-1))"
    cmd += [
        f"steps=choice({args.steps})", lr, "hydra/launcher=multicluster",
        f"hydra/sweeper={sweeper}", "hydra/sweeper/sampler=random",
        f"hydra.sweeper.sampler.seed={seed}",
        f"hydra.sweeper.n_trials={TRIALS}", f"hydra.sweeper.n_jobs={args.jobs}",
        "hydra.sweeper.max_failure_rate=1.0", f"hydra.sweep.dir={sweep_dir}",
        f"hydra.launcher.poll_interval_s={args.poll}", "hydra.launcher.live=false",
    ]  # fmt: skip
    if args.where == "local":
        cmd += ["hydra.launcher.clusters=[local]", f"hydra.launcher.local_parallel={args.jobs}"]
    else:
        cmd += [f"hydra.searchpath=[file://{args.testbed.conf_dir}]",
                "hydra.launcher.clusters=[alpha,beta]"]  # fmt: skip
    return cmd + list(extra)


def run(args, seed: int, name: str, sweeper: str, *extra: str) -> dict:
    sweep_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=args.work))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    start = time.time()
    cmd = sweep_command(args, seed, sweep_dir, sweeper, *extra)
    proc = subprocess.run(cmd, cwd=sweep_dir.parent, env=env, capture_output=True, text=True,
                          timeout=3600)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"{name} sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    figures = measure(sweep_dir, args.jobs)
    figures["wall_s"] = time.time() - start
    figures["dir"] = sweep_dir
    return figures


def measure(sweep_dir: Path, n_jobs: int) -> dict:
    """Makespan, slot time and utilisation from the journal; the trials' params and values."""
    sys.path.insert(0, str(REPO))
    from lingua_sweep.sweep.journal import Journal

    jobs = Journal(sweep_dir).replay().jobs.values()
    starts = {j.index: j.started_at or j.submitted_at for j in jobs}
    slot = sum(j.ended_at - starts[j.index] for j in jobs)
    makespan = max(j.ended_at for j in jobs) - min(j.submitted_at for j in jobs)
    swept = ("steps=", "lr=", "optim.lr=")
    params = {j.index: sorted(o for o in j.overrides if o.startswith(swept)) for j in jobs}
    values = [j.result.get("value") for j in jobs if j.state == "COMPLETED"]
    return {
        "makespan_s": makespan, "slot_s": slot, "utilisation": slot / (n_jobs * makespan),
        "params": params, "best": min(v for v in values if isinstance(v, float)),
        "states": [j.state for j in jobs],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--where", choices=["local", "testbed"], default="local")
    parser.add_argument("--task", choices=["gpu-like", "train"], default="gpu-like")
    parser.add_argument("--jobs", type=int, default=4, help="n_jobs (and local slots)")
    parser.add_argument("--poll", type=float, default=1.0, help="hydra.launcher.poll_interval_s")
    parser.add_argument("--part", choices=["all", "makespan", "pruner"], default="all")
    parser.add_argument("--steps", default="20,240", help="the steps=choice(...) of the trials")
    parser.add_argument("--step-s", type=float, default=0.2, help="gpu-like: seconds per step")
    parser.add_argument("--seeds", default="0,1,2", help="sampler seeds (part 1; part 2: first)")
    args = parser.parse_args()
    if args.task == "train":
        args.steps = args.steps if args.steps != "20,240" else "30,900"
    seeds = [int(s) for s in args.seeds.split(",")]
    args.work = Path(tempfile.mkdtemp(prefix="async-sweep-bench-"))
    args.testbed = None
    if args.where == "testbed":
        sys.path.insert(0, str(REPO / "tests"))
        import slurm_testbed

        args.testbed = slurm_testbed.start()
    print(f"{TRIALS} trials of steps=choice({args.steps}), n_jobs={args.jobs}, task={args.task},"
          f" where={args.where}, poll={args.poll}s; sweeps under {args.work}")  # fmt: skip

    if args.part in ("all", "makespan"):
        print(f"{'seed':6}{'sweeper':16}{'makespan':>10}{'slot time':>11}{'utilisation':>13}"
              f"{'best':>9}")  # fmt: skip
        ratios = []
        for seed in seeds:
            batch = run(args, seed, "batch", "optuna")
            lazy = run(args, seed, "async", "async_optuna")
            assert batch["params"] == lazy["params"], "the two sweeps did not run the same trials"
            for name, f in (("optuna (batch)", batch), ("async_optuna", lazy)):
                print(f"{seed:<6}{name:16}{f['makespan_s']:9.1f}s{f['slot_s']:10.1f}s"
                      f"{f['utilisation']:12.0%}{f['best']:9.4f}")  # fmt: skip
            ratios.append(lazy["makespan_s"] / batch["makespan_s"])
            print(f"{seed:<6}async / batch makespan: {ratios[-1]:.2f}")
        mean = sum(ratios) / len(ratios)
        print(f"async / batch makespan over seeds {args.seeds}: mean {mean:.2f}, "
              f"max {max(ratios):.2f} (target <= 0.75)")  # fmt: skip

    if args.part in ("all", "pruner"):
        plain = run(args, seeds[0], "noprune", "async_optuna")
        pruned = run(args, seeds[0], "median", "async_optuna", "hydra/sweeper/pruner=median",
                     "hydra.sweeper.pruner.n_startup_trials=3")  # fmt: skip
        assert plain["params"] == pruned["params"], "the two sweeps did not run the same trials"
        n_pruned = pruned["states"].count("PRUNED")
        saved = 1 - pruned["slot_s"] / plain["slot_s"]
        print(f"seed {seeds[0]:<17}{'slot time':>10}{'makespan':>10}{'best':>9}  pruned")
        for name, f in (("no pruner", plain), ("median pruner", pruned)):
            print(f"{name:22}{f['slot_s']:9.1f}s{f['makespan_s']:9.1f}s{f['best']:9.4f}"
                  f"  {f['states'].count('PRUNED')}")  # fmt: skip
        same = "equal" if math.isclose(plain["best"], pruned["best"]) else "DIFFERENT"
        print(f"median pruner: {n_pruned} of {TRIALS} trials pruned, slot time -{saved:.0%}, "
              f"best value {same} ({plain['best']:.4f} vs {pruned['best']:.4f})")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--app"]:
        del sys.argv[1]
        app()
    else:
        main()
