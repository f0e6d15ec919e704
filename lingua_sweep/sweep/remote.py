"""Run a command on this machine or on a cluster's login node over ssh, the same way.

ssh always runs with BatchMode=yes: authentication is the user's own ssh config and keys, and a
missing key fails at once instead of prompting for a password. Every call to one login node
goes through one multiplexed connection (ControlMaster, sockets in a private dir), so a sweep
authenticates once; a login node that wants a password and a second factor is opened by the user
with `lingua-sweep login CLUSTER` (ssh itself asks; nothing here ever sees the password).
"""

import contextlib
import hashlib
import os
import shlex
import signal
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

# Never synced to a login node: VCS data, environments, run outputs, caches. The leading slash
# anchors a pattern at the repository root, so only the top-level outputs/ etc. are skipped.
SYNC_EXCLUDES = [
    ".git", "/.venv", "/outputs", "/multirun", "/wandb", "__pycache__", "*.egg-info",
    ".pytest_cache", ".ruff_cache",
]  # fmt: skip


class RemoteError(RuntimeError):
    """A command failed, timed out or could not start; the message says which, where and why."""

    def __init__(
        self,
        *,
        command: str,
        login: str | None,
        returncode: int | None,
        stderr: str,
        reason: str,
    ):
        self.command = command
        self.login = login
        self.returncode = returncode  # None: timed out or never started
        self.stderr = stderr
        self.reason = reason  # one line, for tables: "exit 255: ssh: connect ... refused"
        where = f"on {login}" if login else "locally"
        tail = _tail(stderr)
        super().__init__(f"`{command}` {where}: {reason}" + (f"\n{tail}" if tail else ""))


def _tail(text: str, lines: int = 20, chars: int = 2000) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


CONTROL_PERSIST_S = 600  # a master outlives a sweep's quiet minutes, not the user's day
# A connection that stops answering (a laptop slept, a VPN changed, a hung login node) is
# dropped after about 3 x 10 s instead of holding every multiplexed call to its full timeout.
KEEPALIVE = ("-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3")


def control_dir() -> Path:
    """The private dir of the ControlMaster sockets: short (sockets have a 108-byte path limit),
    owned by this user and closed to everyone else."""
    d = Path(os.environ.get("LINGUA_SWEEP_SSH_DIR") or f"/tmp/lingua_sweep-ssh-{os.getuid()}")
    d.mkdir(mode=0o700, exist_ok=True)
    info = d.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise RuntimeError(f"{d} must belong to you with mode 700 (it holds ssh sockets)")
    return d


def control_options() -> list[str]:
    return [
        "-o", "ControlMaster=auto",
        "-o", f"ControlPath={control_dir()}/%C",
        "-o", f"ControlPersist={CONTROL_PERSIST_S}",
    ]  # fmt: skip


def ssh_command(
    ssh_options: Sequence[str] = (), *, connect_timeout: float, multiplex: bool = True
) -> list[str]:
    """The ssh prefix: non-interactive, bounded connect time, shared connection, own options."""
    return [
        "ssh",
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
        *KEEPALIVE,
        *(control_options() if multiplex else []),
        *ssh_options,
    ]  # fmt: skip


def open_master(login: str, ssh_options: Sequence[str] = ()) -> int:
    """Opens the shared connection interactively: ssh asks for the password/2FA on the tty."""
    argv = ["ssh", *KEEPALIVE, *control_options(), "-o", "ControlMaster=yes", *ssh_options,
            "-fN", login]  # fmt: skip
    return subprocess.run(argv, check=False).returncode


def close_master(login: str, ssh_options: Sequence[str] = (), *, timeout: float = 30) -> None:
    """Ends the shared connection to `login` (the next call opens a fresh one). A master too
    hung to answer is left to its keepalives; this never raises."""
    argv = ["ssh", *control_options(), *ssh_options, "-O", "exit", login]
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run(argv, check=False, capture_output=True, timeout=timeout)


def run(
    argv: Sequence[str],
    *,
    login: str | None,
    ssh_options: Sequence[str] = (),
    timeout: float,
    input: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    abandon_on_timeout: bool = False,
) -> subprocess.CompletedProcess:
    """Runs argv here (login=None) or on `login` over ssh; stdout/stderr come back as text.

    On timeout the command is killed, or, with `abandon_on_timeout`, left to finish on its own
    (an sbatch killed halfway may still land; one left running holds its fence until it has).

    `env` adds variables: merged over this process's environment locally, or set with `env` in
    front of the remote command. Raises RemoteError when it times out, cannot start, or (with
    check) exits non-zero.
    """
    argv = [str(a) for a in argv]
    command = shlex.join(argv)
    if login:
        remote = (
            shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *argv]) if env else command
        )
        cmd = [*ssh_command(ssh_options, connect_timeout=timeout), "--", login, remote]
        full_env = None
    else:
        cmd = argv
        full_env = {**os.environ, **env} if env else None
    data = input.encode() if isinstance(input, str) else input

    try:
        # Own session, so a timeout kills ssh and whatever it started (ProxyCommand...).
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            start_new_session=True,
        )
    except OSError as e:
        raise RemoteError(
            command=command, login=login, returncode=None, stderr="", reason=f"cannot run: {e}"
        ) from e
    try:
        out, err = proc.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        if abandon_on_timeout and not login:
            err = b""  # it goes on in its own session; its answer is read from the fence
        else:
            _kill_group(proc)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a grandchild outside the group holds the pipes
                out, err = b"", b""
        raise RemoteError(
            command=command,
            login=login,
            returncode=None,
            stderr=err.decode(errors="replace"),
            reason=f"timed out after {timeout:g}s",
        ) from None

    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if check and proc.returncode != 0:
        last = _tail(stderr, lines=1, chars=200) or "(no stderr)"
        raise RemoteError(
            command=command,
            login=login,
            returncode=proc.returncode,
            stderr=stderr,
            reason=f"exit {proc.returncode}: {last}",
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def sync_code(
    src: Path,
    login: str | None,
    dest: str,
    ssh_options: Sequence[str] = (),
    timeout: float = 300,
) -> None:
    """Copies the repository at src to dest on the login node (rsync -az --delete over ssh).

    dest may be relative to the remote home. Excluded paths that exist at dest (the cluster's
    own .venv, outputs) are left alone: --delete only removes files that are synced.
    """
    run(["mkdir", "-p", dest], login=login, ssh_options=ssh_options, timeout=timeout)
    remote_dest = f"{login}:{dest}" if login else dest
    _rsync(
        f"{src}/",
        f"{remote_dest}/",
        ["--delete", *(f"--exclude={p}" for p in SYNC_EXCLUDES)],
        login=login,
        ssh_options=ssh_options,
        timeout=timeout,
    )


def tree_hash(src: Path) -> str:
    """A hash of every file sync_code would copy (paths and contents): the snapshot's name."""
    digest = hashlib.sha256()
    for path in sorted(_synced_files(src)):
        rel = path.relative_to(src).as_posix()
        digest.update(rel.encode() + b"\0")
        digest.update(path.read_bytes() if not path.is_symlink() else os.readlink(path).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _synced_files(src: Path):
    for root, dirs, files in os.walk(src):
        rel_root = Path(root).relative_to(src)
        dirs[:] = [d for d in dirs if not _excluded(rel_root / d)]
        for name in files:
            if not _excluded(rel_root / name):
                yield Path(root) / name


def _excluded(rel: Path) -> bool:
    for pattern in SYNC_EXCLUDES:
        if pattern.startswith("/"):
            if rel.as_posix() == pattern[1:]:
                return True
        elif any(Path(part).match(pattern) for part in rel.parts):
            return True
    return False


def sync_snapshot(
    src: Path,
    login: str | None,
    root: str,
    ssh_options: Sequence[str] = (),
    timeout: float = 300,
) -> str:
    """Copies src to `root/<hash of its files>` once and returns that dir; never changes it later.

    A later sweep with other code gets another dir, so the code under pending and requeued jobs
    of this one stays what they were submitted with. The copy lands in a temporary dir first and
    is renamed into place, so a half-copied snapshot is never used.
    """
    dest = f"{root.rstrip('/')}/{tree_hash(src)}"
    exists = run(["test", "-d", dest], login=login, ssh_options=ssh_options, timeout=timeout,
                 check=False)  # fmt: skip
    if exists.returncode == 0:
        return dest
    tmp = f"{dest}.incoming.{os.getpid()}"
    sync_code(src, login, tmp, ssh_options=ssh_options, timeout=timeout)
    moved = run(["mv", "-T", tmp, dest], login=login, ssh_options=ssh_options, timeout=timeout,
                check=False)  # fmt: skip
    if moved.returncode != 0:  # another sweep renamed the same snapshot first: same content
        run(["rm", "-rf", tmp], login=login, ssh_options=ssh_options, timeout=timeout, check=False)
    return dest


def fetch_dir(
    login: str | None,
    src: str,
    dest: Path,
    ssh_options: Sequence[str] = (),
    timeout: float = 300,
    exclude: Sequence[str] = (),
) -> None:
    """Copies src on the login node into the local dir dest (rsync over ssh), minus `exclude`."""
    dest.mkdir(parents=True, exist_ok=True)
    remote_src = f"{login}:{src}" if login else src
    _rsync(
        f"{remote_src}/",
        f"{dest}/",
        [f"--exclude={p}" for p in exclude],
        login=login,
        ssh_options=ssh_options,
        timeout=timeout,
    )


def _rsync(
    src: str,
    dest: str,
    options: list[str],
    *,
    login: str | None,
    ssh_options: Sequence[str],
    timeout: float,
) -> None:
    cmd = ["rsync", "-az", *options]
    if login:
        cmd += ["-e", shlex.join(ssh_command(ssh_options, connect_timeout=min(timeout, 30)))]
    run([*cmd, src, dest], login=None, timeout=timeout)
