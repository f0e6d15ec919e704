"""Fault scenarios on the testbed: a real sweep, a real fault at a chosen moment, the invariants.

    result = run_scenario(testbed, workdir, Scenario("slow-sbatch", fault="slow_sbatch", ...))
    assert result.violations == []

A scenario runs a small sweep of tests/apps/rank_app.py (jobs of a few seconds) with the basic or
the async Optuna sweeper, on alpha (Slurm on this machine), beta (over ssh) or both. Its fault
starts at a moment read off the journal (`at`: the first intent, submission, RUNNING job), or
from the start; `interrupt` stops the launcher at a named faultpoint (SIGKILL, or SIGINT: a
Ctrl-C). Then every fault is undone, the sweep is picked up again (`resume`: rerun the command,
or `lingua-sweep resume`) until it ends, and the invariants are checked: I7 on each launcher
process (exit 0/1/2/130, no traceback), I8 (after the resume every job is final), I1-I6 by
`lingua-sweep check`'s own code. The tests (tests/test_sweep_faults.py) run a fixed matrix;
bench/faults.py runs random ones for as long as it is told.
"""

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sweep_helpers import LINGUA_SWEEP, REPO, cancel_leftovers, clean_env, journal_records

from faults import injectors
from lingua_sweep.sweep import check as check_lib

APP = REPO / "tests" / "apps" / "rank_app.py"
MOMENTS = ("start", "intent", "submitted", "running")
FAULTS = (
    "none", "slow_sbatch", "slow_sbatch_after", "sbatch_refused", "flaky_sacct", "flaky_squeue",
    "hung_squeue", "noisy_agent", "sshd_down", "ssh_hung", "ssh_master_killed",
    "slurmctld_restart", "slurmdbd_down", "scancel_refused", "cancel_cli", "resume_false",
    "detach", "full_disk",
)  # fmt: skip
SSH_ONLY = ("noisy_agent", "sshd_down", "ssh_hung", "ssh_master_killed")


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: str = "none"
    at: str = "start"  # when the fault starts: one of MOMENTS
    seconds: float = 15.0  # how long it lasts (or how slow a slow command is)
    sweeper: str = "basic"  # basic | async
    clusters: tuple[str, ...] = ("beta",)
    interrupt: str | None = None  # "<faultpoint>:KILL" or "<faultpoint>:INT"
    resume: str = "rerun"  # rerun | cli (`lingua-sweep resume`)
    jobs: int = 3
    sleep_s: float = 3.0  # each job's length


@dataclass
class Result:
    scenario: Scenario
    violations: list[str] = field(default_factory=list)
    launches: list[tuple[int, str]] = field(default_factory=list)  # (exit code, stderr tail)
    wall_s: float = 0.0
    fault_window: tuple[float, float] | None = None  # when the fault was on (epoch s)


def sweep_command(sc: Scenario, testbed, sweep_dir: Path, conf: Path, *extra: str) -> list[str]:
    clusters = ",".join(sc.clusters)
    cmd = [sys.executable, str(APP), "-m", "hydra/launcher=multicluster",
           f"hydra.searchpath=[file://{conf}]", f"hydra.launcher.clusters=[{clusters}]",
           "hydra.launcher.poll_interval_s=0.5", "hydra.launcher.probe_every_s=2",
           "hydra.launcher.remote_timeout_s=8", f"hydra.sweep.dir={sweep_dir}",
           # A whole node per job: two at a time per cluster, so both clusters get work.
           f"hydra.launcher.cpus_per_task={testbed.cpus_per_node}",
           f"sleep_s={sc.sleep_s}"]  # fmt: skip
    if sc.sweeper == "async":
        cmd += ["hydra/sweeper=async_optuna", f"hydra.sweeper.n_trials={sc.jobs}",
                "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.seed=1",
                "value=interval(1,10)"]  # fmt: skip
    else:
        cmd += ["value=" + ",".join(str(i + 1) for i in range(sc.jobs))]
    return [*cmd, *extra]


def run_scenario(testbed, workdir: Path, sc: Scenario, *, timeout: float = 240) -> Result:
    t0 = time.monotonic()
    result = Result(sc)
    workdir.mkdir(parents=True, exist_ok=True)
    sweep_dir = workdir / "sweep"
    ssh_dir = Path(tempfile.mkdtemp(prefix="lsf-ssh-", dir="/tmp"))
    env = clean_env(LINGUA_SWEEP_SSH_DIR=str(ssh_dir))
    commands = injectors.CommandFaults(workdir / "bin")
    faulty = dict.fromkeys(sc.clusters, commands)
    conf = injectors.conf_with_faults(testbed, workdir / "conf", faulty)
    if sc.fault == "noisy_agent":
        _noisy_python(conf, workdir)
    extra = ["hydra.launcher.detach=true"] if sc.fault == "detach" else []
    cmd = sweep_command(sc, testbed, sweep_dir, conf, *extra)
    first_env = {**env, "LINGUA_SWEEP_FAULTPOINT": sc.interrupt} if sc.interrupt else env
    disk = _FillableDisk(sweep_dir) if sc.fault == "full_disk" else contextlib.nullcontext()
    try:
        with commands, disk:
            proc = subprocess.Popen(cmd, cwd=workdir, env=first_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)  # fmt: skip
            fault = _FaultThread(sc, testbed, sweep_dir, commands, ssh_dir, cmd, env, disk)
            fault.start()
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                result.violations.append(f"I8 the launcher did not end within {timeout:g}s")
            fault.stop()
            result.violations += fault.problems
            result.fault_window = fault.window
        result.launches.append((proc.returncode, err[-2000:]))
        killed = proc.returncode == -9
        if not killed:
            result.violations += [f"I7 first launch: {p}" for p in
                                  injectors.exit_problems(proc.returncode, err)]  # fmt: skip
        _settle_in_flight(workdir, commands)
        # Picked up again until it ends (a Ctrl-C'd sweep ends cancelled: nothing to resume).
        again = cmd if sc.resume == "rerun" else [LINGUA_SWEEP, "resume", str(sweep_dir)]
        if sc.fault == "detach" or proc.returncode != 0 or _open_jobs(sweep_dir):
            proc2 = subprocess.run(again, cwd=workdir, env=env, capture_output=True, text=True,
                                   timeout=timeout)  # fmt: skip
            result.launches.append((proc2.returncode, proc2.stderr[-2000:]))
            problems = injectors.exit_problems(proc2.returncode, proc2.stderr)
            result.violations += [f"I7 resume: {p}" for p in problems]
        left = _open_jobs(sweep_dir)
        if left:
            result.violations.append(f"I8 after the resume, jobs not final: {left}")
        result.violations += [str(v) for v in check_lib.check(sweep_dir, settle_s=15)]
    finally:
        shutil.rmtree(ssh_dir, ignore_errors=True)
        cancel_leftovers(testbed, sweep_dir)  # a failed scenario must not hold the next's nodes
    result.wall_s = time.monotonic() - t0
    return result


def _open_jobs(sweep_dir: Path) -> list[int]:
    from lingua_sweep.sweep.journal import Journal

    state = Journal(sweep_dir).replay()
    return sorted(i for i, j in state.jobs.items() if not j.final)


def _settle_in_flight(workdir: Path, commands) -> None:
    """A wrapper made slow goes on after the launcher is gone, as a real sbatch would; wait for
    the ones under way to end before the next launch, so what it finds is settled."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
        c.in_flight for cmd in ("sbatch", "scancel") for c in commands.history(cmd)
    ):
        time.sleep(0.5)


def _noisy_python(conf: Path, workdir: Path) -> None:
    """beta's `python` prints a line of its own after the agent's answer, as login scripts and
    site wrappers do: the answer is then not the last line."""
    import yaml

    wrapper = workdir / "noisy-python"
    wrapper.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nrc=$?\necho "motd: have a nice day"\n'
                       "exit $rc\n")  # fmt: skip
    wrapper.chmod(0o755)
    path = conf / "cluster" / "beta.yaml"
    beta = yaml.safe_load(path.read_text())
    beta["python"] = str(wrapper)
    path.write_text(yaml.safe_dump(beta))


class _FillableDisk:
    """The sweep dir on a small filesystem of its own, filled up at the fault's moment; after
    the launcher is gone the files move back onto the real disk for the resume."""

    def __init__(self, path: Path, size_kb: int = 4096):
        self.path, self.size_kb = path, size_kb

    def __enter__(self):
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_kb}k", "lsf-disk",
                        str(self.path)], check=True, timeout=30)  # fmt: skip
        return self

    def fill(self) -> None:
        injectors._fill(self.path / injectors.FILLER, 0)

    def __exit__(self, *exc):
        saved = Path(tempfile.mkdtemp(prefix="lsf-disk-"))
        shutil.copytree(self.path, saved, symlinks=True, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(injectors.FILLER))  # fmt: skip
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], check=True)
        shutil.copytree(saved, self.path, symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(saved, ignore_errors=True)


class _FaultThread(threading.Thread):
    """Waits for the scenario's moment, then applies its fault for `seconds` (or once)."""

    def __init__(self, sc, testbed, sweep_dir, commands, ssh_dir, cmd, env, disk):
        super().__init__(daemon=True)
        self.sc, self.testbed, self.sweep_dir, self.commands = sc, testbed, sweep_dir, commands
        self.ssh_dir, self.cmd, self.env, self.disk = ssh_dir, cmd, env, disk
        self.done = threading.Event()
        self.problems: list[str] = []
        self.window: tuple[float, float] | None = None

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=120)

    def _moment(self) -> bool:
        kinds = {"intent": "intent", "submitted": "submitted"}
        while not self.done.is_set():
            records = journal_records(self.sweep_dir)
            if (
                self.sc.at == "start"
                or (self.sc.at in kinds and any(r["kind"] == kinds[self.sc.at] for r in records))
                or (self.sc.at == "running" and any(r.get("state") == "RUNNING" for r in records))
            ):
                return True
            time.sleep(0.2)
        return False

    def run(self) -> None:
        if self.sc.fault in ("none", "detach", "noisy_agent") or not self._moment():
            return
        start = time.time()
        try:
            self._apply()
        except Exception as e:  # noqa: BLE001 - a broken injector is a finding, not a crash
            self.problems.append(f"fault {self.sc.fault} could not be applied: {e}")
        self.window = (start, time.time())

    def _hold(self) -> None:
        self.done.wait(self.sc.seconds)

    def _apply(self) -> None:
        sc, tb, f = self.sc, self.testbed, self.sc.fault
        c = self.commands
        cluster = sc.clusters[-1]
        if f == "slow_sbatch":
            c.set("sbatch", "slow_before", seconds=sc.seconds)
        elif f == "slow_sbatch_after":
            c.set("sbatch", "slow_after", seconds=sc.seconds)
        elif f == "sbatch_refused":
            c.set("sbatch", "refuse", times=2)
        elif f in ("flaky_sacct", "flaky_squeue"):
            c.set(f.split("_")[1], "flaky")
            self._hold()
            c.clear(f.split("_")[1])
        elif f == "hung_squeue":
            c.set("squeue", "hang")
            self._hold()
            c.clear("squeue")
        elif f == "sshd_down":
            with injectors.sshd_down(tb):
                self._hold()
        elif f == "ssh_hung":
            with injectors.ssh_hung(tb):
                self._hold()
        elif f == "ssh_master_killed":
            injectors.kill_control_master(self.ssh_dir, tb.beta_login,
                                          ["-F", str(tb.ssh_config)])  # fmt: skip
        elif f == "slurmctld_restart":
            injectors.restart_slurmctld(tb, cluster)
        elif f == "slurmdbd_down":
            with injectors.slurmdbd_down(tb):
                self._hold()
        elif f in ("scancel_refused", "cancel_cli"):
            if f == "scancel_refused":
                c.set("scancel", "refuse", times=3, message="scancel: error: Socket timed out")
            done = subprocess.run([LINGUA_SWEEP, "cancel", str(self.sweep_dir)], env=self.env,
                                  capture_output=True, text=True, timeout=200)  # fmt: skip
            self.problems += [f"I7 lingua-sweep cancel: {p}" for p in
                              injectors.exit_problems(done.returncode, done.stderr)]  # fmt: skip
        elif f == "resume_false":
            self._resume_false()
        elif f == "full_disk":
            self.disk.fill()
        else:
            raise ValueError(f"unknown fault {f!r}")

    def _resume_false(self) -> None:
        """The same command with resume=false beside the sweep: refused in one line while a
        launcher runs it or it has jobs not final, its journal untouched; a fresh start only
        once it has ended."""
        journal = self.sweep_dir / "journal.jsonl"
        before = journal.read_bytes()
        other = subprocess.run([*self.cmd, "hydra.launcher.resume=false"], env=self.env,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        if other.returncode == 0:
            if check_lib.launcher_running(self.sweep_dir):
                self.problems.append("resume=false started afresh beside a live launcher")
            return  # the sweep had ended (or its launcher died with every job final)
        # A Hydra app that is not the trainer: Hydra prints the one line and exits 1.
        said = "already being run by" in other.stderr or "not final" in other.stderr
        if (
            other.returncode not in (1, 2)
            or not said
            or injectors.exit_problems(other.returncode, other.stderr)
        ):
            self.problems.append(f"resume=false beside a sweep: exit {other.returncode}, "
                                 f"{other.stderr[-300:]!r}")  # fmt: skip
        if not journal.read_bytes().startswith(before):
            self.problems.append("a refused resume=false changed the sweep's journal")


def summary_line(results: list[Result]) -> str:
    bad = [r for r in results if r.violations]
    return json.dumps({"scenarios": len(results), "with_violations": len(bad)})
