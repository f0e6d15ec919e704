"""One protocol for talking to a cluster, two ways to do it.

`InProcessBackend`: the cluster's Slurm answers here (a local SLURM_CONF, or we are on its login
node), or it is the `local` cluster (jobs are processes on this machine): the agent's functions
run in this process. `SshBackend`: everything goes through `python -m lingua_sweep.sweep.agent`
on the login node, over the one multiplexed ssh connection, in an immutable code snapshot.

Every method may raise RemoteError (the cluster did not answer); the controller decides what
that means. Idempotent calls (poll, find, cancel, fetch) are retried with backoff here first.
"""

import base64
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import cloudpickle

from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError
from lingua_sweep.sweep import agent, remote

T = TypeVar("T")
RETRY_DELAYS_S = (1.0, 3.0)  # then the controller marks the cluster unreachable for a while


class Backend(Protocol):
    cluster: ClusterConfig
    code: dict[str, Any]  # where the jobs' code is: {"snapshot": dir} for a remote cluster

    def prepare(self) -> None:
        """Everything needed before the first submission (code, environment); idempotent."""

    def submit(self, tasks: list[agent.JobTask], *, folder: str, params: dict) -> list[str]: ...

    def poll(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def find(self, name: str) -> list[str]: ...

    def cancel(self, ids: list[str]) -> None: ...

    def fetch(self, remote_dir: str, local_dir: Path) -> None: ...

    def missing(self, paths: list[str]) -> list[str]: ...


def retry(call: Callable[[], T], delays: tuple[float, ...] = RETRY_DELAYS_S) -> T:
    for delay in delays:
        try:
            return call()
        except remote.RemoteError:
            time.sleep(delay)
    return call()


@contextlib.contextmanager
def cluster_environ(cluster: ClusterConfig):
    """The cluster's environment (e.g. SLURM_CONF) for Slurm commands run in this process."""
    saved = {k: os.environ.get(k) for k in cluster.env}
    os.environ.update(cluster.env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class InProcessBackend:
    def __init__(self, cluster: ClusterConfig):
        self.cluster = cluster
        self.code: dict[str, Any] = {}

    def prepare(self) -> None:
        pass  # the code is this process's own

    def submit(self, tasks, *, folder, params) -> list[str]:
        with cluster_environ(self.cluster):
            return agent.submit(tasks, folder=folder, params=params, slurm=self.cluster.slurm)

    def poll(self, request):
        with cluster_environ(self.cluster):
            return retry(lambda: agent.poll(request, slurm=self.cluster.slurm))

    def find(self, name):
        if not self.cluster.slurm:
            return []  # a `local` job is started by this very call: no sbatch to look for
        with cluster_environ(self.cluster):
            return retry(lambda: agent.find_batch(name))

    def cancel(self, ids):
        with cluster_environ(self.cluster):
            retry(lambda: agent.cancel(ids, slurm=self.cluster.slurm))

    def fetch(self, remote_dir, local_dir):
        pass  # outputs are already on this filesystem

    def missing(self, paths):
        return agent.missing_paths(paths)


class SshBackend:
    def __init__(self, cluster: ClusterConfig, *, code_root: Path, timeout_s: float):
        self.cluster = cluster
        self.code_root = code_root
        self.timeout = timeout_s
        self.code: dict[str, Any] = {}

    def _ssh(self, argv: list[str], **kw):
        return remote.run(
            argv, login=self.cluster.login, ssh_options=self.cluster.ssh_options,
            timeout=self.timeout, **kw,
        )  # fmt: skip

    def _environment(self) -> str:
        """The agent's shell prelude: the cluster's `env` (e.g. SLURM_CONF), the environment
        dir, the snapshot as working dir (jobs submitted from there run its code)."""
        env = {**self.cluster.env, "UV_PROJECT_ENVIRONMENT": self.code["env_dir"]}
        exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())
        return exports + f"cd {shlex.quote(self.code['snapshot'])}"

    def prepare(self) -> None:
        if self.code:
            return
        c = self.cluster
        snapshot = remote.sync_snapshot(
            self.code_root, c.login, c.remote_code_dir, ssh_options=c.ssh_options,
            timeout=max(self.timeout, 300),
        )  # fmt: skip
        lock = self.code_root / "uv.lock"
        lock_hash = remote.file_hash(lock) if lock.exists() else "nolock"
        self.code = {"snapshot": snapshot, "env_dir": f"{c.env_root.rstrip('/')}/{lock_hash}"}
        # The setup lines (uv sync, module loads) build the environment once per snapshot: a
        # marker in the snapshot says it is done, so polls never pay for them.
        setup = " && ".join(c.setup) or "true"
        version = "import sys; print('%d.%d' % sys.version_info[:2])"
        script = (
            f"{self._environment()} && "
            f"{{ test -e .lingua_setup_done || {{ {setup} && touch .lingua_setup_done; }}; }} && "
            f"{c.python} -c {shlex.quote(version)}"
        )
        try:
            out = self._ssh(["bash", "-lc", script], check=True).stdout.strip().splitlines()
        except remote.RemoteError:
            self.code = {}
            raise
        here = "{}.{}".format(*sys.version_info[:2])
        if not out or out[-1] != here:
            self.code = {}
            raise UserError(
                f"cluster {c.name}: `{c.python}` is Python {out[-1] if out else '?'}, this "
                f"machine runs {here}; jobs are pickled here and must load there: set the "
                f"cluster's `python:` (or pin the version in its `setup:`) to Python {here}"
            )

    def _agent(self, args: list[str], stdin: bytes | None = None) -> str:
        command = (
            f"{self._environment()} && "
            f"{self.cluster.python} -m lingua_sweep.sweep.agent {shlex.join(args)}"
        )
        return self._ssh(["bash", "-lc", command], input=stdin).stdout

    def submit(self, tasks, *, folder, params) -> list[str]:
        blob = base64.b64encode(cloudpickle.dumps(tasks))
        out = self._agent(["submit", "--folder", folder, "--params", json.dumps(params)], blob)
        return json.loads(out.strip().splitlines()[-1])

    def poll(self, request):
        def call():
            out = self._agent(["poll"], json.dumps(request).encode())
            return cloudpickle.loads(base64.b64decode(out.strip().splitlines()[-1]))

        return retry(call)

    def find(self, name):
        return retry(
            lambda: json.loads(self._agent(["find", "--name", name]).strip().splitlines()[-1])
        )

    def cancel(self, ids):
        if ids:
            retry(lambda: self._agent(["cancel", "--jobs", ",".join(ids)]))

    def fetch(self, remote_dir, local_dir):
        """Brings a job's small outputs home (metrics, configs, status), not its checkpoints."""
        c = self.cluster
        retry(
            lambda: remote.fetch_dir(
                c.login,
                remote_dir,
                local_dir,
                ssh_options=c.ssh_options,
                timeout=self.timeout,
                exclude=["checkpoints", ".submitit"],
            )  # fmt: skip
        )

    def missing(self, paths):
        out = self._agent(["check", "--paths", json.dumps(paths)])
        return json.loads(out.strip().splitlines()[-1])


def make_backend(
    cluster: ClusterConfig, *, here: ClusterConfig | None, code_root: Path, timeout_s: float
):
    return (
        InProcessBackend(cluster)
        if is_local(cluster, here)
        else SshBackend(cluster, code_root=code_root, timeout_s=timeout_s)
    )


def is_local(cluster: ClusterConfig, here: ClusterConfig | None) -> bool:
    """In-process when the cluster has no Slurm, no login node, or we are on its login node."""
    if not cluster.slurm or cluster.login is None:
        return True
    return here is not None and here.slurm and here.login == cluster.login
