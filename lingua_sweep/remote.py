"""Run a command on this machine or on a cluster's login node over ssh, the same way.

ssh always runs with BatchMode=yes: authentication is the user's own ssh config and keys, and a
missing key fails at once instead of prompting for a password.
"""

import contextlib
import os
import shlex
import signal
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


def ssh_command(ssh_options: Sequence[str] = (), *, connect_timeout: float) -> list[str]:
    """The ssh prefix: non-interactive, bounded connect time, the cluster's own options."""
    return [
        "ssh",
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
        *ssh_options,
    ]  # fmt: skip


def run(
    argv: Sequence[str],
    *,
    login: str | None,
    ssh_options: Sequence[str] = (),
    timeout: float,
    input: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Runs argv here (login=None) or on `login` over ssh; stdout/stderr come back as text.

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
