"""Real fault injectors for the Slurm testbed (tests/slurm_testbed.py): faults as they happen in
life, slow, hung and half-done, not only refused at once.

Slurm commands (put first on a cluster's PATH through its yaml's `env`):

    faults = CommandFaults(dir)                      # wrappers for sbatch, sacct, squeue, scancel
    faults.set(cmd, mode, *, seconds=0, times=None, message=None, returncode=1)
        "slow_before": sleep `seconds`, then run the real command
        "slow_after":  run the real command (the job IS submitted), sleep, then print and return
        "refuse":      exit `returncode` with `message` on stderr (after `seconds`), for the next
                       `times` calls (None: every call), then behave normally
        "flaky":       the same, every other call (the first call after set fails); the default
                       message is slurmdbd's "Connection refused"
        "hang":        block until the behaviour is changed, then behave as the new one says
    faults.clear(cmd=None)                           # back to the real command (all: None)
    faults.calls(cmd) -> int                         # calls so far, whatever they did
    faults.history(cmd) -> list[Call]   # per call: n, pid, mode, called, real_start, real_end,
                                        # real_rc, returned, rc (epoch s; None: not done/never)
    faults.path(base=SYSTEM_PATH) -> str             # "dir:base", for a PATH
    faults.close()                                   # fails hung calls, clears all (also `with`)
    conf_with_faults(testbed, dest_dir, {cluster: faults or dir}) -> Path   # a Hydra searchpath

ssh to beta's login node:

    with sshd_down(testbed, *, drop_sessions=True): ...  # listener stopped (and its sessions)
    with ssh_hung(testbed): ...                          # sshd SIGSTOPped: connections hang
    kill_control_master(control, login, ssh_options=()) -> int | None   # SIGKILL, stale socket

Slurm daemons:

    restart_slurmctld(testbed, cluster, *, sig=SIGTERM, down_s=0) -> int   # the new pid
    with slurmctld_down(testbed, cluster, *, sig=SIGTERM): ...   # commands fail after ~9 s
    with slurmdbd_down(testbed, *, hung=False): ...   # sacct fails at once, or hangs (hung=True)

The machine:

    with full_disk(path, size_kb=64, *, free_kb=0, keep=False): ...    # writes fail with ENOSPC
    exit_problems(returncode, stderr) -> list[str]    # invariant I7 of a launcher process

Every context manager restores what it broke on exit, also when its body raises. Only processes
the testbed recorded (or their sshd children, found through /proc) are signalled, by pid.

A sweep with faulty commands on beta:

    faults = CommandFaults(tmp_path / "beta-bin")
    conf = conf_with_faults(testbed, tmp_path / "conf", {"beta": faults})
    faults.set("sbatch", "slow_after", seconds=150)      # now, or mid-sweep: read at each call
    subprocess.Popen(sweep_cmd(testbed, sweep_dir, ..., conf_dir=conf), ...)

Notes. A wrapper's state is in <dir>/.faults (<cmd>.rule, <cmd>.log); the real commands are
those on PATH (without dir) when CommandFaults is made. A killed wrapper ends with its caller's
process group locally; on a login node it goes on after its ssh dies (as real commands do) until
it ends, or close() fails it if it hangs. These faults hit the whole testbed: give a fault test
a testbed of its own (LINGUA_TESTBED_DIR, LINGUA_TESTBED_PORT_BASE) while other sessions use one.
"""

import contextlib
import errno
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import slurm_testbed as testbed_lib
import yaml

COMMANDS = ("sbatch", "sacct", "squeue", "scancel")
MODES = ("normal", "slow_before", "slow_after", "refuse", "flaky", "hang")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SLURMDBD_REFUSED = (
    "{cmd}: error: slurm_persist_conn_open_without_init: failed to open persistent connection to"
    " host:127.0.0.1:6819: Connection refused\n"
    "{cmd}: error: Sending PersistInit msg: Connection refused\n"
    "{cmd}: error: Problem talking to the database: Connection refused"
)
QOS_REFUSED = (
    "sbatch: error: QOSMaxSubmitJobPerUserLimit\n"
    "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit"
    " limit, user's size and/or time limits)"
)
CTLD_REFUSED = "{cmd}: error: Unable to contact slurm controller (connect failure)"


# --- Slurm commands ------------------------------------------------------------------------

# POSIX sh. The behaviour (<state>/<cmd>.rule) is read at each call: "MODE SECONDS TIMES BASE RC
# GEN" then the message. Each call appends "<token> <event> <epoch> [...]" lines to <cmd>.log:
# call (with its mode), real_start, real_end (with the real exit code), return (with its own).
_WRAPPER = r"""#!/bin/sh
# A fault wrapper for `@CMD@` (tests/faults/injectors.py); it reads its behaviour at each call.
D=@STATE@
REAL=@REAL@
RULE="$D/@CMD@.rule"
LOG="$D/@CMD@.log"
nl='
'
gone() { printf '%s\n' "@CMD@: fault wrapper: $D is gone" >&2; exit 127; }
[ -d "$D" ] || gone
now() { date +%s.%N; }
note() { printf '%s %s\n' "$tok" "$*" >>"$LOG"; }
finish() { note return "$(now)" "$1"; exit "$1"; }
load() {
  rule=$(cat "$RULE" 2>/dev/null)
  mode=normal secs=0 times=- base=0 rc=1 msg=
  if [ -n "$rule" ]; then
    read -r mode secs times base rc gen <<EOF
$rule
EOF
    case $rule in *"$nl"*) msg=${rule#*"$nl"} ;; esac
  fi
}
pause() {  # $1 seconds, in slices: a killed wrapper leaves no long sleep behind
  end=$(awk -v a="$(now)" -v s="$1" 'BEGIN { printf "%.3f", a + s }')
  while left=$(awk -v e="$end" -v n="$(now)" \
      'BEGIN { d = e - n; if (d <= 0) exit 1; printf "%.3f", (d < 0.5 ? d : 0.5) }'); do
    sleep "$left"
  done
}
fail() {
  [ "$secs" = 0 ] || pause "$secs"
  printf '%s\n' "$msg" >&2
  finish "$rc"
}
run_real() {
  note real_start "$(now)"
  "$REAL" "$@"
  code=$?
  note real_end "$(now)" "$code"
}

tok="$$.$(date +%s%N)"
load
note call "$(now)" "$mode"
n=$(awk -v t="$tok" '$2 == "call" { c++ } $1 == t && $2 == "call" { print c; exit }' "$LOG")
n=${n:-0}
while [ "$mode" = hang ]; do
  held=$rule
  while [ "$(cat "$RULE" 2>/dev/null)" = "$held" ]; do sleep 0.2; done
  [ -d "$D" ] || gone
  load
done
case $mode in
  refuse) if [ "$times" = - ] || [ $((n - base)) -le "$times" ]; then fail; fi ;;
  flaky) if [ $(((n - base) % 2)) -ne 0 ]; then fail; fi ;;
  slow_before) pause "$secs" ;;
esac
if [ "$mode" = slow_after ]; then
  out=$(mktemp "$D/out.XXXXXX")
  err=$(mktemp "$D/err.XXXXXX")
  run_real "$@" >"$out" 2>"$err"
  pause "$secs"
  cat "$out"
  cat "$err" >&2
  rm -f "$out" "$err"
else
  run_real "$@"
fi
finish "$code"
"""


@dataclass(frozen=True)
class Call:
    """One call of a wrapped command; times are epoch seconds (time.time()), None: not (yet)."""

    n: int  # 1 for the first call of this command in this dir
    pid: int  # the wrapper's
    mode: str  # its behaviour when it started
    called: float
    real_start: float | None  # the real command: never run when it was refused
    real_end: float | None
    real_rc: int | None
    returned: float | None  # None: still running, or killed
    rc: int | None  # what the caller got

    @property
    def in_flight(self) -> bool:
        return self.returned is None and _pid_running(self.pid)


class CommandFaults:
    """Wrappers for Slurm's commands in `dir`, each doing what the latest `set` says."""

    def __init__(self, dir: str | Path, commands: Sequence[str] = COMMANDS):
        self.dir = Path(dir).resolve()
        self.state = self.dir / ".faults"
        self.state.mkdir(parents=True, exist_ok=True)
        search = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
        search = [p for p in search if Path(p).resolve() != self.dir] + SYSTEM_PATH.split(":")
        self.real: dict[str, str] = {}
        for cmd in commands:
            real = shutil.which(cmd, path=os.pathsep.join(search))
            if real is None:
                raise RuntimeError(f"fault wrappers: no real `{cmd}` on {os.pathsep.join(search)}")
            self.real[cmd] = os.path.abspath(real)
            text = _WRAPPER.replace("@CMD@", cmd).replace("@STATE@", shlex.quote(str(self.state)))
            wrapper = self.dir / cmd
            wrapper.write_text(text.replace("@REAL@", shlex.quote(self.real[cmd])))
            wrapper.chmod(0o755)
            self.clear(cmd)
        self.commands = tuple(commands)

    def path(self, base: str = SYSTEM_PATH) -> str:
        """A PATH with the wrappers first."""
        return f"{self.dir}{os.pathsep}{base}"

    def set(
        self,
        cmd: str,
        mode: str,
        *,
        seconds: float = 0.0,
        times: int | None = None,
        message: str | None = None,
        returncode: int = 1,
    ) -> None:
        """From the next call of `cmd` on (and for calls hung now), behave as `mode` says."""
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {', '.join(MODES)}")
        if message is None:
            defaults = {"refuse": QOS_REFUSED if cmd == "sbatch" else CTLD_REFUSED}
            message = defaults.get(mode, SLURMDBD_REFUSED).format(cmd=cmd)
        base = self.calls(cmd)  # `times` and "every other" count from here
        fields = [mode, f"{seconds:g}", "-" if times is None else str(times), str(base),
                  str(returncode), str(time.time_ns())]  # fmt: skip
        rule = self._file(cmd, "rule")
        tmp = rule.with_name(f".{rule.name}.{os.getpid()}")
        tmp.write_text(" ".join(fields) + "\n" + message.rstrip("\n") + "\n")
        os.replace(tmp, rule)  # a wrapper never reads half a rule

    def clear(self, cmd: str | None = None) -> None:
        """The real command again (for every command if None); hung calls go on and run it."""
        for c in [cmd] if cmd else self.commands:
            self.set(c, "normal", message="")

    def calls(self, cmd: str) -> int:
        return sum(1 for line in self._log_lines(cmd) if line[1:2] == ["call"])

    def history(self, cmd: str) -> list[Call]:
        calls: dict[str, dict] = {}
        for tok, event, *rest in self._log_lines(cmd):
            if event == "call":
                calls[tok] = {"n": len(calls) + 1, "pid": int(tok.split(".")[0]),
                              "called": float(rest[0]), "mode": rest[1]}  # fmt: skip
            elif tok in calls and event in ("real_start", "real_end", "return"):
                key = "returned" if event == "return" else event
                calls[tok][key] = float(rest[0])
                if len(rest) > 1:
                    calls[tok]["rc" if event == "return" else "real_rc"] = int(rest[1])
        fields = ("real_start", "real_end", "real_rc", "returned", "rc")
        return [Call(**{**dict.fromkeys(fields), **c}) for c in calls.values()]

    def close(self, timeout: float = 10) -> None:
        """Fails the calls hung now (so nothing runs after the test), then clears everything."""
        hung = {
            c
            for c in self.commands
            if any(x.in_flight and x.mode == "hang" for x in self.history(c))
        }
        for cmd in hung:
            self.set(cmd, "refuse", message=f"{cmd}: fault injector closed")
        deadline = time.monotonic() + timeout
        while hung and time.monotonic() < deadline:
            if not any(x.in_flight for c in hung for x in self.history(c) if x.mode == "hang"):
                break
            time.sleep(0.1)
        self.clear()

    def __enter__(self) -> "CommandFaults":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _file(self, cmd: str, kind: str) -> Path:
        if cmd not in self.real:
            raise ValueError(f"no fault wrapper for {cmd!r}; wrapped: {', '.join(self.real)}")
        return self.state / f"{cmd}.{kind}"

    def _log_lines(self, cmd: str) -> list[list[str]]:
        try:
            text = self._file(cmd, "log").read_text()
        except FileNotFoundError:
            return []
        return [line.split() for line in text.splitlines() if len(line.split()) >= 3]


def conf_with_faults(
    testbed,
    dest_dir: str | Path,
    faults: Mapping[str, "CommandFaults | str | Path"],
    *,
    base_path: str = SYSTEM_PATH,
) -> Path:
    """A copy of the testbed's conf dir whose clusters in `faults` have their wrappers first on
    PATH (their other env keys kept); for `hydra.searchpath=[file://<returned dir>]`."""
    dest = Path(dest_dir).resolve()
    shutil.copytree(testbed.conf_dir, dest, dirs_exist_ok=True)
    for cluster, f in faults.items():
        path = dest / "cluster" / f"{cluster}.yaml"
        if not path.exists():
            raise ValueError(f"no cluster {cluster!r} in {testbed.conf_dir}/cluster")
        wrappers = f.dir if isinstance(f, CommandFaults) else Path(f).resolve()
        cfg = yaml.safe_load(path.read_text())
        cfg["env"] = {**(cfg.get("env") or {}), "PATH": f"{wrappers}{os.pathsep}{base_path}"}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


# --- processes, by pid ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Proc:
    """A process by pid and start time: a signal never reaches a later process with its pid."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> "_Proc | None":
        stat = _stat(pid)
        return cls(pid, int(stat[19])) if stat else None

    def state(self) -> str | None:
        stat = _stat(self.pid)
        return stat[0] if stat and int(stat[19]) == self.start else None

    def signal(self, sig: int) -> bool:
        if self.state() in (None, "Z"):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
            return True
        return False


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name: [state, ppid, ...]."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pid_running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _descendants(root: int, prefix: str) -> list[_Proc]:
    """root's descendants (through /proc) whose executable's name starts with prefix, parents
    before children ("sshd": OpenSSH 9.8+ serves sessions from sshd-session, older from sshd)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _stat(int(entry.name))):
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        todo += children.get(pid, [])
        if Path(_exe(pid) or "/").name.startswith(prefix) and (proc := _Proc.of(pid)):
            out.append(proc)
    return out


def _wait_until(what: str, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"faults: {what}: not after {timeout:g}s")
        time.sleep(0.1)


def _sshd(testbed) -> int:
    pid = testbed_lib.daemon_pid("sshd", testbed.state_dir)
    if pid is None:
        raise RuntimeError("faults: the testbed's sshd does not run")
    return pid


# --- ssh -----------------------------------------------------------------------------------


@contextlib.contextmanager
def sshd_down(testbed, *, drop_sessions: bool = True) -> Iterator[None]:
    """beta's login node is gone: its sshd stopped, so new connections are refused; with
    drop_sessions its open sessions (a ControlMaster's included) are ended too, as in a reboot.
    On exit sshd starts again and the context returns once `ssh beta-hn true` works."""
    pid = _sshd(testbed)
    sessions = _descendants(pid, "sshd") if drop_sessions else []
    try:
        testbed_lib.stop_daemon("sshd", testbed.state_dir)
        for p in sessions:
            p.signal(signal.SIGTERM)
        with contextlib.suppress(RuntimeError):
            _wait_until("sshd sessions to end", lambda: all(not p.state() for p in sessions), 5)
        for p in sessions:
            p.signal(signal.SIGKILL)
        yield
    finally:
        if testbed_lib.daemon_pid("sshd", testbed.state_dir) is None:
            testbed_lib.start_daemon("sshd", testbed.state_dir)


@contextlib.contextmanager
def ssh_hung(testbed) -> Iterator[None]:
    """beta's login node hangs: its sshd listener and every sshd serving a session are SIGSTOPped.
    Connections stay open and nothing answers; a new one times out in the banner exchange, a
    command over an open ControlMaster blocks (ConnectTimeout does not apply). SIGCONT on exit."""
    pid = _sshd(testbed)
    stopped: list[_Proc] = []
    try:
        listener = _Proc.of(pid)
        if listener and listener.signal(signal.SIGSTOP):  # first: no new session meanwhile
            stopped.append(listener)
        for p in _descendants(pid, "sshd"):
            if p.signal(signal.SIGSTOP):
                stopped.append(p)
        _wait_until("sshd to stop", lambda: all(p.state() in ("T", None) for p in stopped), 5)
        yield
    finally:
        for p in reversed(stopped):
            p.signal(signal.SIGCONT)


def kill_control_master(
    control: str | Path, login: str, ssh_options: Sequence[str] = ()
) -> int | None:
    """SIGKILLs the ControlMaster of `login` (control: the dir of `<dir>/%C` sockets, as the
    launcher's LINGUA_SWEEP_SSH_DIR, or the socket itself), as a laptop's sleep does: its socket
    stays behind, stale. Returns the master's pid, or None if no master answers there."""
    control = Path(control)
    path = f"{control}/%C" if control.is_dir() else str(control)
    argv = ["ssh", "-o", f"ControlPath={path}", *ssh_options, "-O", "check", login]
    check = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    m = re.search(r"Master running \(pid=(\d+)\)", check.stderr + check.stdout)
    if check.returncode != 0 or not m:
        return None
    pid = int(m.group(1))
    ssh = os.path.realpath(shutil.which("ssh") or "/usr/bin/ssh")
    proc = _Proc.of(pid)
    if proc is None or _exe(pid) != ssh:
        raise RuntimeError(f"faults: pid {pid} is not an ssh ControlMaster ({_exe(pid)})")
    proc.signal(signal.SIGKILL)
    _wait_until(f"ssh master {pid} to die", lambda: proc.state() in (None, "Z"), 10)
    return pid


# --- Slurm daemons -------------------------------------------------------------------------


@contextlib.contextmanager
def slurmctld_down(testbed, cluster: str, *, sig: int = signal.SIGTERM) -> Iterator[None]:
    """The cluster's slurmctld stopped with `sig` (SIGKILL: a crash); its commands retry ~9 s,
    then fail "Unable to contact slurm controller". On exit it starts again from its saved state
    (running jobs go on) and the context returns once every node has left the `unk` state."""
    name = f"slurmctld-{cluster}"
    if testbed_lib.daemon_pid(name, testbed.state_dir) is None:
        raise RuntimeError(f"faults: {name} does not run")
    try:
        testbed_lib.stop_daemon(name, testbed.state_dir, sig=sig)
        yield
    finally:
        if testbed_lib.daemon_pid(name, testbed.state_dir) is None:
            testbed_lib.start_daemon(name, testbed.state_dir)
        _wait_until(f"{cluster}'s nodes to register", lambda: _nodes_known(testbed, cluster), 60)


def restart_slurmctld(
    testbed, cluster: str, *, sig: int = signal.SIGTERM, down_s: float = 0.0
) -> int:
    """Stops the cluster's slurmctld, waits down_s, starts it again: see slurmctld_down.
    Returns the new slurmctld's pid. A crash (SIGKILL) loses what slurmctld had not saved yet (it
    saves every few seconds): a job submitted or started just before comes back PENDING and
    starts again, or is gone altogether (its nodes kill what slurmctld does not know) although
    sbatch gave its id."""
    with slurmctld_down(testbed, cluster, sig=sig):
        time.sleep(down_s)
    return testbed_lib.daemon_pid(f"slurmctld-{cluster}", testbed.state_dir)


def _nodes_known(testbed, cluster: str) -> bool:
    env = {**os.environ, "SLURM_CONF": str(testbed.state_dir / cluster / "slurm.conf")}
    argv = ["sinfo", "--noheader", "--Node", "--format=%t"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    states = [s.rstrip("*~#$@") for s in proc.stdout.split()]
    return proc.returncode == 0 and bool(states) and "unk" not in states


@contextlib.contextmanager
def slurmdbd_down(testbed, *, hung: bool = False) -> Iterator[None]:
    """Accounting is gone: slurmdbd stopped (sacct fails at once, "Connection refused"), or with
    hung=True SIGSTOPped (sacct blocks, with no timeout of its own). squeue and sbatch still
    work; slurmctld keeps the records for later. On exit it runs again and the context returns
    once `sacct` answers."""
    pid = testbed_lib.daemon_pid("slurmdbd", testbed.state_dir)
    if pid is None:
        raise RuntimeError("faults: slurmdbd does not run")
    proc = _Proc.of(pid)
    try:
        if hung:
            proc.signal(signal.SIGSTOP)
            _wait_until("slurmdbd to stop", lambda: proc.state() in ("T", None), 5)
        else:
            testbed_lib.stop_daemon("slurmdbd", testbed.state_dir)
        yield
    finally:
        if hung:
            proc.signal(signal.SIGCONT)
        elif testbed_lib.daemon_pid("slurmdbd", testbed.state_dir) is None:
            testbed_lib.start_daemon("slurmdbd", testbed.state_dir)
        _wait_until("sacct to answer", lambda: _sacct_answers(testbed), 60)


def _sacct_answers(testbed) -> bool:
    argv = ["sacct", "-X", "-n", "-S", "now-5minutes", "-o", "JobID"]
    try:
        proc = subprocess.run(argv, env=testbed.env_alpha(), capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


# --- the machine ---------------------------------------------------------------------------

FILLER = ".full_disk_filler"


@contextlib.contextmanager
def full_disk(
    path: str | Path, size_kb: int = 64, *, free_kb: int = 0, keep: bool = False
) -> Iterator[Path]:
    """A full disk at `path` (an empty or new dir; root only): a tmpfs of size_kb, filled so that
    a write fails with ENOSPC once free_kb (whole 4 KB pages) are used: free_kb > 0 gives
    half-done writes. New empty files can still be created. On exit it is unmounted (lazily if
    busy); with keep, what was written there (not the filler) is copied into the dir beneath."""
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(path) or any(path.iterdir()):
        raise ValueError(f"full_disk: {path} must be an empty dir and no mount point")
    argv = ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=755", "lingua-full-disk"]
    subprocess.run([*argv, str(path)], check=True, capture_output=True, timeout=30)
    try:
        _fill(path / FILLER, free_kb)
        yield path
    finally:
        saved = Path(tempfile.mkdtemp(prefix="full_disk-")) if keep else None
        try:
            if saved:
                ignore = shutil.ignore_patterns(FILLER)
                shutil.copytree(path, saved, symlinks=True, ignore=ignore, dirs_exist_ok=True)
            umount = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
            if umount.returncode != 0:  # a process still works in there: detach it anyway
                subprocess.run(["umount", "-l", str(path)], check=True, capture_output=True)
            if saved:
                shutil.copytree(saved, path, symlinks=True, dirs_exist_ok=True)
        finally:
            if saved:
                shutil.rmtree(saved, ignore_errors=True)


def _fill(filler: Path, free_kb: int) -> None:
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                os.write(fd, chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - free_kb * 1024))
    finally:
        os.close(fd)


def exit_problems(returncode: int | None, stderr: str | bytes | None) -> list[str]:
    """Invariant I7 of a launcher process: it exits with 0, 1, 2 or 130 and prints no Python
    traceback. One readable line per problem; [] when it holds."""
    allowed = (0, 1, 2, 130)
    problems = []
    if returncode is None:
        problems.append("the process has not exited")
    elif returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        problems.append(f"killed by signal {name} (exit code must be one of 0, 1, 2, 130)")
    elif returncode not in allowed:
        problems.append(f"exit code {returncode} is not one of 0, 1, 2, 130")
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    lines = (stderr or "").splitlines()
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        # The exception is the first line after the frames that is not indented.
        exc = next((x for x in lines[i + 1 :] if x.strip() and not x[0].isspace()), None)
        problems.append(f"Python traceback on stderr: {(exc or '(no exception line)').strip()}")
    return problems
