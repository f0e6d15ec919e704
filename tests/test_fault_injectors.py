"""The fault injectors of tests/faults do what they say, on the real testbed: a slow sbatch lands
late, a refused one submits nothing, a hung squeue blocks until released, a stopped or hung sshd
refuses or freezes, a killed ControlMaster leaves its socket, slurmctld comes back with its
jobs, slurmdbd's absence breaks sacct only, a full disk says ENOSPC.

These faults hit the whole testbed: while another session uses the default one, give this file
its own (LINGUA_TESTBED_DIR=/tmp/other LINGUA_TESTBED_PORT_BASE=28140).
"""

import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import slurm_testbed as testbed_lib
import yaml
from faults import (
    CommandFaults,
    conf_with_faults,
    exit_problems,
    full_disk,
    kill_control_master,
    restart_slurmctld,
    slurmctld_down,
    slurmdbd_down,
    ssh_hung,
    sshd_down,
)
from sweep_helpers import wait_for

slurm = pytest.mark.slurm


def _alpha(testbed, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """A real Slurm command on alpha, around the wrappers."""
    return subprocess.run(argv, env=testbed.env_alpha(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _name() -> str:
    return f"fault-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def control_dir():
    """A private ControlMaster dir (short: sockets have a 108-byte path limit)."""
    d = Path(f"/tmp/lsf-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    d.mkdir(mode=0o700)
    yield d
    for sock in d.iterdir():  # a master left by a failed test
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                       capture_output=True, timeout=10)  # fmt: skip
    shutil.rmtree(d, ignore_errors=True)


def _ssh(testbed, control: Path | None, *opts: str) -> list[str]:
    mux = ["-o", f"ControlPath={control}/%C"] if control else ["-o", "ControlPath=none"]
    return ["ssh", "-F", str(testbed.ssh_config), *mux, *opts, testbed.beta_login]


def _open_master(testbed, control: Path) -> None:
    argv = _ssh(testbed, control, "-o", "ControlMaster=yes", "-o", "ControlPersist=60", "-fN")
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    check = subprocess.run([*_ssh(testbed, control), "-O", "check"], capture_output=True,
                           text=True, timeout=10)  # fmt: skip
    assert check.returncode == 0 and "Master running" in check.stderr, check.stderr


def _timed(argv: list[str], timeout: float, **kw) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    return proc, time.monotonic() - t0


# --- Slurm commands ------------------------------------------------------------------------


@slurm
def test_a_slow_sbatch_submits_late_or_answers_late(slurm_testbed, tmp_path):
    faults = CommandFaults(tmp_path / "bin")
    env = {**slurm_testbed.env_alpha(), "PATH": faults.path()}
    name = _name()
    sbatch = ["sbatch", "--parsable", "--hold", "-J", name, "-o", "/dev/null", "--wrap", "sleep 60"]
    try:
        # slow_before: nothing is submitted for 3 s, then the job is.
        faults.set("sbatch", "slow_before", seconds=3)
        first, took = _timed(sbatch, 30, env=env)
        assert first.returncode == 0 and first.stdout.strip().isdigit(), first.stderr
        assert took >= 3
        (call,) = faults.history("sbatch")
        assert call.mode == "slow_before" and call.real_start - call.called >= 3
        assert call.returned - call.real_end < 1 and call.rc == call.real_rc == 0

        # slow_after: the job is in the queue while sbatch has not answered yet.
        faults.set("sbatch", "slow_after", seconds=3)
        proc = subprocess.Popen(sbatch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        try:
            wait_for(lambda: faults.calls("sbatch") == 2 and faults.history("sbatch")[1].real_end,
                     15, "the real sbatch")  # fmt: skip
            queued = _alpha(slurm_testbed, "squeue", "-h", "-n", name, "-o", "%i").stdout.split()
            assert proc.poll() is None  # still silent
            out, err = proc.communicate(timeout=15)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        assert sorted(queued) == sorted([first.stdout.strip(), out.strip()])
        call = faults.history("sbatch")[-1]
        assert call.n == 2 and call.returned - call.real_end >= 3
        assert call.real_start - call.called < 1
    finally:
        _alpha(slurm_testbed, "scancel", "-n", name)


@slurm
def test_refused_and_flaky_calls_then_exact_args_and_stdin(slurm_testbed, tmp_path, monkeypatch):
    faults = CommandFaults(tmp_path / "bin")
    # Made again with its own dir first on PATH, it still wraps the real commands.
    monkeypatch.setenv("PATH", faults.path(os.environ["PATH"]))
    faults = CommandFaults(tmp_path / "bin")
    monkeypatch.undo()
    assert faults.real["sbatch"] == os.path.abspath(shutil.which("sbatch"))
    env = {**slurm_testbed.env_alpha(), "PATH": faults.path()}
    name = f"{_name()} with 'quotes' and spaces"
    script = '#!/bin/sh\n# a script on stdin: $HOME "quoted"\nsleep 60\n'
    sbatch = ["sbatch", "--parsable", "--hold", "-J", name, "-o", "/dev/null"]
    try:
        faults.set(
            "sbatch", "refuse", times=2, message="sbatch: error: QOSMaxSubmitJobPerUserLimit"
        )
        results = [subprocess.run(sbatch, input=script, env=env, capture_output=True, text=True,
                                  timeout=30) for _ in range(3)]  # fmt: skip
        assert [r.returncode for r in results] == [1, 1, 0]
        assert results[0].stderr == "sbatch: error: QOSMaxSubmitJobPerUserLimit\n"
        assert results[0].stdout == ""
        assert [c.real_start is None for c in faults.history("sbatch")] == [True, True, False]
        job_id = results[2].stdout.strip()
        # Only the third call submitted, with its name and its script as given.
        queued = _alpha(slurm_testbed, "squeue", "-h", "-u", "root", "-o", "%i|%j").stdout
        assert [line for line in queued.splitlines() if line.endswith(name)] == [f"{job_id}|{name}"]
        written = _alpha(slurm_testbed, "scontrol", "write", "batch_script", job_id, "-").stdout
        assert written == script

        faults.set("sacct", "flaky")
        sacct = ["sacct", "-X", "-n", "-j", job_id, "-o", "JobID"]
        rcs = [subprocess.run(sacct, env=env, capture_output=True, text=True, timeout=30)
               for _ in range(4)]  # fmt: skip
        assert [r.returncode for r in rcs] == [1, 0, 1, 0]
        assert "Problem talking to the database: Connection refused" in rcs[0].stderr
        assert faults.calls("sacct") == 4 and faults.calls("sbatch") == 3

        cancel = subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
        assert cancel.returncode == 0 and faults.calls("scancel") == 1
        state = _alpha(slurm_testbed, "squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip()
        assert state in ("", "CANCELLED")
    finally:
        _alpha(slurm_testbed, "scancel", "-n", name)


@slurm
def test_conf_with_faults_puts_the_wrappers_first_and_keeps_the_rest(slurm_testbed, tmp_path):
    faults = CommandFaults(tmp_path / "bin")
    conf = conf_with_faults(slurm_testbed, tmp_path / "conf", {"alpha": faults, "beta": "/x/y"})
    originals = slurm_testbed.cluster_conf_dir

    def load(root: Path, name: str) -> dict:
        return yaml.safe_load((root / f"{name}.yaml").read_text())

    alpha, beta = load(conf / "cluster", "alpha"), load(conf / "cluster", "beta")
    assert alpha["env"] == {**load(originals, "alpha")["env"], "PATH": faults.path()}
    assert alpha["env"]["SLURM_CONF"] == str(slurm_testbed.alpha_slurm_conf)
    assert beta["env"]["PATH"].split(":")[0] == "/x/y"
    assert load(conf / "cluster", "alpha-gpu") == load(originals, "alpha-gpu")
    for cfg, name in ((alpha, "alpha"), (beta, "beta")):
        assert {k: v for k, v in cfg.items() if k != "env"} == {
            k: v for k, v in load(originals, name).items() if k != "env"
        }
    with pytest.raises(ValueError):
        conf_with_faults(slurm_testbed, tmp_path / "conf2", {"gamma": faults})


@slurm
def test_a_hung_squeue_on_beta_waits_until_cleared_and_close_fails_it(slurm_testbed, tmp_path):
    """Through ssh with the PATH of the cluster yaml, as the launcher runs it on a login node."""
    faults = CommandFaults(tmp_path / "bin")
    conf = conf_with_faults(slurm_testbed, tmp_path / "conf", {"beta": faults})
    path = yaml.safe_load((conf / "cluster" / "beta.yaml").read_text())["env"]["PATH"]
    remote = shlex.join(["env", f"PATH={path}", "squeue", "-h", "-o", "%i"])
    argv = [*_ssh(slurm_testbed, None), remote]

    def start() -> subprocess.Popen:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = []
    try:
        with faults:
            faults.set("squeue", "hang")
            procs.append(start())
            wait_for(lambda: faults.calls("squeue") == 1, 15, "squeue on beta-hn")
            time.sleep(2)
            assert procs[0].poll() is None  # hung, on the login node
            (call,) = faults.history("squeue")
            assert call.in_flight and call.real_start is None and call.mode == "hang"
            released = time.time()
            faults.clear("squeue")  # the hung call goes on and runs the real squeue
            out, err = procs[0].communicate(timeout=15)
            assert procs[0].returncode == 0, err
            call = faults.history("squeue")[0]
            assert call.real_start >= released - 0.5 and call.rc == 0

            faults.set("squeue", "hang")
            procs.append(start())
            wait_for(lambda: faults.calls("squeue") == 2, 15, "the second squeue")
        # Leaving the block failed the hung call: nothing runs after a test.
        out, err = procs[1].communicate(timeout=15)
        assert procs[1].returncode == 1 and "fault injector closed" in err
        assert faults.history("squeue")[1].real_start is None
        assert (tmp_path / "bin" / ".faults" / "squeue.rule").read_text().startswith("normal ")
    finally:
        for p in procs:
            p.kill()


# --- ssh -----------------------------------------------------------------------------------


@slurm
def test_sshd_down_refuses_new_connections_and_drops_open_ones(slurm_testbed, control_dir):
    _open_master(slurm_testbed, control_dir)
    before = testbed_lib.daemon_pid("sshd", slurm_testbed.state_dir)
    with sshd_down(slurm_testbed):
        assert testbed_lib.daemon_pid("sshd", slurm_testbed.state_dir) is None
        fresh, took = _timed([*_ssh(slurm_testbed, None, "-o", "ConnectTimeout=5"), "true"], 15)
        assert fresh.returncode == 255 and "Connection refused" in fresh.stderr and took < 5
        check = [*_ssh(slurm_testbed, control_dir), "-O", "check"]
        wait_for(lambda: subprocess.run(check, capture_output=True, timeout=10).returncode != 0,
                 5, "the master to go with its session")  # fmt: skip
    after = testbed_lib.daemon_pid("sshd", slurm_testbed.state_dir)
    assert after not in (None, before)
    back, _ = _timed([*_ssh(slurm_testbed, None, "-o", "ConnectTimeout=5"), "true"], 15)
    assert back.returncode == 0, back.stderr


@slurm
def test_sshd_down_restarts_sshd_when_its_body_raises(slurm_testbed):
    with pytest.raises(KeyError), sshd_down(slurm_testbed, drop_sessions=False):
        raise KeyError("boom")
    assert testbed_lib.daemon_pid("sshd", slurm_testbed.state_dir) is not None
    back, _ = _timed([*_ssh(slurm_testbed, None, "-o", "ConnectTimeout=5"), "true"], 15)
    assert back.returncode == 0, back.stderr


@slurm
def test_ssh_hung_blocks_a_command_over_an_open_master(slurm_testbed, control_dir):
    _open_master(slurm_testbed, control_dir)
    over_master = [*_ssh(slurm_testbed, control_dir, "-o", "ConnectTimeout=5"), "true"]
    with ssh_hung(slurm_testbed):
        t0 = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):  # runs past its ConnectTimeout of 5 s
            subprocess.run(over_master, capture_output=True, timeout=8)
        assert time.monotonic() - t0 >= 8
        # A new connection is accepted by the kernel, and then nothing says hello.
        fresh, took = _timed([*_ssh(slurm_testbed, None, "-o", "ConnectTimeout=2"), "true"], 15)
        assert fresh.returncode == 255 and "banner exchange" in fresh.stderr and took >= 2
    after, took = _timed(over_master, 15)
    assert after.returncode == 0 and took < 5, after.stderr
    stopped = [p for p in _sshd_family(slurm_testbed) if _state(p) == "T"]
    assert not stopped


def _sshd_family(testbed) -> list[int]:
    from faults.injectors import _descendants

    pid = testbed_lib.daemon_pid("sshd", testbed.state_dir)
    return [pid, *(p.pid for p in _descendants(pid, "sshd"))]


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@slurm
def test_kill_control_master_leaves_a_stale_socket(slurm_testbed, control_dir):
    opts = ["-F", str(slurm_testbed.ssh_config)]
    assert kill_control_master(control_dir, slurm_testbed.beta_login, opts) is None  # none yet
    _open_master(slurm_testbed, control_dir)
    (sock,) = control_dir.iterdir()
    pid = kill_control_master(control_dir, slurm_testbed.beta_login, opts)
    assert pid and _state(pid) in (None, "Z")
    assert sock.is_socket()  # left behind
    check = subprocess.run([*_ssh(slurm_testbed, control_dir), "-O", "check"],
                           capture_output=True, text=True, timeout=10)  # fmt: skip
    assert check.returncode == 255 and "Connection refused" in check.stderr
    assert kill_control_master(sock, slurm_testbed.beta_login, opts) is None


# --- Slurm daemons -------------------------------------------------------------------------


@slurm
def test_slurmctld_down_fails_commands_slowly_and_comes_back_with_its_jobs(slurm_testbed):
    name = _name()
    try:
        job_id = _alpha(slurm_testbed, "sbatch", "--parsable", "-n1", "-J", name, "-o",
                        "/dev/null", "--wrap", "sleep 120").stdout.strip()  # fmt: skip
        where = ["squeue", "-h", "-j", job_id, "-o", "%T %N"]
        running = wait_for(lambda: _running(_alpha(slurm_testbed, *where).stdout), 30, "the job")
        before = testbed_lib.daemon_pid("slurmctld-alpha", slurm_testbed.state_dir)
        with slurmctld_down(slurm_testbed, "alpha"):
            assert testbed_lib.daemon_pid("slurmctld-alpha", slurm_testbed.state_dir) is None
            down, took = _timed(["squeue", "-h"], 60, env=slurm_testbed.env_alpha())
            assert down.returncode == 1 and "Unable to contact slurm controller" in down.stderr
            assert took > 3  # Slurm retries before it gives up
        after = testbed_lib.daemon_pid("slurmctld-alpha", slurm_testbed.state_dir)
        assert after not in (None, before)
        assert _alpha(slurm_testbed, *where).stdout.strip() == running  # the same job, still on
    finally:
        _alpha(slurm_testbed, "scancel", "-n", name)


def _running(out: str) -> str | None:
    return out.strip() if out.startswith("RUNNING ") else None


@slurm
def test_restart_slurmctld_after_a_crash_keeps_a_running_job(slurm_testbed):
    name = _name()
    try:
        job_id = _alpha(slurm_testbed, "sbatch", "--parsable", "-n1", "-J", name, "-o",
                        "/dev/null", "--wrap", "sleep 120").stdout.strip()  # fmt: skip
        where = ["squeue", "-h", "-j", job_id, "-o", "%T %N"]
        running = wait_for(lambda: _running(_alpha(slurm_testbed, *where).stdout), 30, "the job")
        # A crash loses what slurmctld has not saved yet (it saves every few seconds): a job that
        # had just started would come back PENDING and be started again.
        seen = time.time()
        saved = slurm_testbed.state_dir / "alpha" / "ctld" / "job_state"
        wait_for(lambda: saved.stat().st_mtime > seen, 20, "slurmctld to save the running job")
        before = testbed_lib.daemon_pid("slurmctld-alpha", slurm_testbed.state_dir)
        after = restart_slurmctld(slurm_testbed, "alpha", sig=signal.SIGKILL, down_s=1)
        assert after not in (None, before) and _state(before) in (None, "Z")
        assert _alpha(slurm_testbed, *where).stdout.strip() == running
        states = _alpha(slurm_testbed, "sinfo", "-h", "-N", "-o", "%t").stdout.split()
        assert "unk" not in [s.rstrip("*") for s in states]
    finally:
        _alpha(slurm_testbed, "scancel", "-n", name)


@slurm
def test_slurmdbd_down_breaks_sacct_but_not_squeue(slurm_testbed):
    sacct = ["sacct", "-X", "-n", "-S", "now-5minutes", "-o", "JobID"]
    with slurmdbd_down(slurm_testbed):
        assert testbed_lib.daemon_pid("slurmdbd", slurm_testbed.state_dir) is None
        down = _alpha(slurm_testbed, *sacct)
        assert down.returncode == 1 and "Connection refused" in down.stderr
        assert _alpha(slurm_testbed, "squeue", "-h").returncode == 0
    assert _alpha(slurm_testbed, *sacct).returncode == 0


@slurm
def test_a_hung_slurmdbd_makes_sacct_block(slurm_testbed):
    sacct = ["sacct", "-X", "-n", "-S", "now-5minutes", "-o", "JobID"]
    pid = testbed_lib.daemon_pid("slurmdbd", slurm_testbed.state_dir)
    with slurmdbd_down(slurm_testbed, hung=True):
        assert _state(pid) == "T"
        with pytest.raises(subprocess.TimeoutExpired):
            _alpha(slurm_testbed, *sacct, timeout=4)
    assert _state(pid) in ("S", "R")  # the same slurmdbd, going on
    assert _alpha(slurm_testbed, *sacct).returncode == 0


# --- the machine ---------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_fails_writes_with_enospc_then_works(tmp_path):
    disk = tmp_path / "disk"
    with full_disk(disk) as path:
        assert os.path.ismount(path)
        with pytest.raises(OSError) as e, open(path / "journal.jsonl", "w") as f:
            f.write("x" * 10)
        assert e.value.errno == errno.ENOSPC
    assert not os.path.ismount(disk) and list(disk.iterdir()) == []
    (disk / "journal.jsonl").write_text("x" * 100_000)  # the disk beneath has room

    # free_kb: a write that starts and does not finish; keep copies it out.
    half = tmp_path / "half"
    with full_disk(half, free_kb=4, keep=True):
        fd = os.open(half / "log", os.O_WRONLY | os.O_CREAT)
        try:
            assert os.write(fd, b"y" * 10_000) == 4096  # a short write...
            with pytest.raises(OSError) as e:
                os.write(fd, b"y")  # ...then none
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
    assert not os.path.ismount(half)
    assert [p.name for p in half.iterdir()] == ["log"] and (half / "log").stat().st_size == 4096

    with pytest.raises(ValueError), full_disk(half):  # not over a dir with something in it
        pass
    assert not os.path.ismount(half)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_unmounts_when_its_body_raises(tmp_path):
    with pytest.raises(KeyError), full_disk(tmp_path / "disk"):
        raise KeyError("boom")
    assert not os.path.ismount(tmp_path / "disk")


def test_exit_problems_of_real_processes():
    def run(code: str) -> list[str]:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=30)  # fmt: skip
        return exit_problems(proc.returncode, proc.stderr)

    assert run("print('ok')") == []
    assert run("import sys; sys.exit('a usage error')") == []  # 1, one line, no traceback
    assert run("import sys; sys.exit(130)") == []
    assert run("import sys; sys.exit(3)") == ["exit code 3 is not one of 0, 1, 2, 130"]
    assert run("raise ValueError('boom')") == ["Python traceback on stderr: ValueError: boom"]
    assert run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)") == [
        "killed by signal SIGKILL (exit code must be one of 0, 1, 2, 130)"
    ]
    chained = "try:\n    1/0\nexcept Exception:\n    raise RuntimeError('while failing')"
    problems = run(chained)
    assert problems == [
        "Python traceback on stderr: ZeroDivisionError: division by zero",
        "Python traceback on stderr: RuntimeError: while failing",
    ]
    assert exit_problems(0, b"Traceback (most recent call last):\n  File ...\nKeyError: 'x'\n")
    assert exit_problems(None, "") == ["the process has not exited"]
