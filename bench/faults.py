"""Fault soak: random faults at random moments during real sweeps on the Slurm testbed, each
followed by a resume and every invariant of `lingua-sweep check` (tests/faults/campaign.py).

    .venv/bin/python bench/faults.py --seed 1 --minutes 60      # as root: it runs a testbed

Each scenario draws a fault (slow/refused/flaky/hung Slurm commands, sshd down or hung, a killed
ssh master, slurmctld restarted, slurmdbd down, a cancel or a resume=false beside the launcher,
detach, a full disk), the moment it starts at, how long it lasts, the sweeper (basic or async
Optuna), the clusters (alpha here, beta over ssh, or both), and whether the launcher is also
stopped at a named faultpoint (kill -9, or Ctrl-C) and resumed by a rerun or `lingua-sweep
resume`. It prints one line per scenario and, at the end, scenarios run, faults by kind,
violations and wall time (also as JSON with --json-out). A scenario with a violation is kept
(its sweep dir) and listed, with its seed, so that it can be replayed alone (--replay N).
"""

import argparse
import collections
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import slurm_testbed  # noqa: E402
from faults.campaign import FAULTS, SSH_ONLY, Scenario, run_scenario  # noqa: E402

from lingua_sweep.sweep.faultpoint import POINTS  # noqa: E402

CLUSTER_SETS = [("alpha",), ("beta",), ("alpha", "beta")]
# Faults that act on a sweep already under way (they read or write its journal).
NEED_A_SWEEP = ("resume_false", "cancel_cli", "scancel_refused", "full_disk")


def draw(rng: random.Random, n: int) -> Scenario:
    fault = rng.choice(FAULTS)
    sweeper = "basic" if fault in ("detach", "full_disk") else rng.choice(["basic", "async"])
    clusters = rng.choice(CLUSTER_SETS)
    if fault in SSH_ONLY and "beta" not in clusters:
        clusters = ("alpha", "beta")
    at = rng.choice(["submitted", "running"] if fault in NEED_A_SWEEP else
                    ["start", "intent", "submitted", "running"])  # fmt: skip
    interrupt = None
    if fault != "detach" and rng.random() < 0.5:
        interrupt = f"{rng.choice(POINTS)}:{rng.choice(['KILL', 'KILL', 'KILL', 'INT'])}"
    return Scenario(
        name=f"#{n} {fault}@{at}" + (f" +{interrupt}" if interrupt else ""),
        fault=fault,
        at=at,
        seconds=round(rng.uniform(3, 25), 1),
        sweeper=sweeper,
        clusters=clusters,
        interrupt=interrupt,
        # Rerunning a detach=true command detaches again, by design: resume it with the CLI.
        resume="cli" if fault == "detach" else rng.choice(["rerun", "cli"]),
        jobs=rng.randint(2, 4),
        sleep_s=round(rng.uniform(1, 4), 1),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-scenarios", type=int, default=10**6)
    parser.add_argument("--replay", type=int, help="run only scenario number N of this seed")
    parser.add_argument("--testbed-dir", type=Path, default=slurm_testbed.DEFAULT_DIR)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    testbed = slurm_testbed.start(args.testbed_dir)
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    t0 = time.monotonic()
    results, kept = [], []
    by_fault: collections.Counter = collections.Counter()
    n = 0
    while time.monotonic() < deadline and n < args.max_scenarios:
        sc = draw(rng, n)
        n += 1
        if args.replay is not None and n - 1 != args.replay:
            continue
        workdir = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
        result = run_scenario(testbed, workdir, sc)
        by_fault[sc.fault] += 1
        ok = not result.violations
        results.append(result)
        print(f"{'ok ' if ok else 'BAD'} {result.wall_s:5.1f}s {sc.name} [{sc.sweeper}, "
              f"{'+'.join(sc.clusters)}, resume by {sc.resume}]", flush=True)  # fmt: skip
        for v in result.violations:
            print(f"      {v}", flush=True)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            kept.append({"scenario": asdict(sc), "workdir": str(workdir),
                         "violations": result.violations})  # fmt: skip
        if args.replay is not None:
            break
    wall = time.monotonic() - t0
    summary = {
        "seed": args.seed,
        "scenarios": len(results),
        "with_violations": len(kept),
        "violations": sum(len(r.violations) for r in results),
        "faults": dict(sorted(by_fault.items())),
        "interrupted": sum(1 for r in results if r.scenario.interrupt),
        "by_sweeper": dict(collections.Counter(r.scenario.sweeper for r in results)),
        "wall_s": round(wall, 1),
        "mean_scenario_s": round(wall / max(1, len(results)), 1),
        "kept": kept,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "kept"}, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=1, default=str))
    return 1 if kept else 0


if __name__ == "__main__":
    sys.exit(main())
