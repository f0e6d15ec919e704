"""One protocol for talking to a cluster, two ways to do it (and a simulated cluster,
`sim_backend.SimBackend`, for benchmarks).

`LocalBackend`: the `local` cluster (no Slurm): jobs are processes on this machine, started and
watched in this process. `AgentBackend`: a Slurm cluster. Everything goes through `python -m
lingua_sweep.sweep.agent` in a process of its own: here (the cluster's Slurm answers on this
machine, e.g. a local SLURM_CONF, or we are on its login node) or on its login node over the
one multiplexed ssh connection, in an immutable code snapshot. A process of its own, because
every call then has a deadline, and an sbatch outlives a launcher killed in the middle of it
holding its fence (see agent.submit_fenced).

Every method may raise RemoteError (the cluster did not answer, or its answer was unreadable:
for a submission, "unknown", which only `resolve` can settle); the controller decides what that
means. Idempotent calls (poll, resolve, cancel, fetch) are retried with backoff here first.
"""

import base64
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import cloudpickle

from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError
from lingua_sweep.sweep import agent, clock, job, remote
from lingua_sweep.sweep.limits import Limits

T = TypeVar("T")
RETRY_DELAYS_S = (1.0, 3.0)  # then the controller marks the cluster unreachable for a while


class Backend(Protocol):
    cluster: ClusterConfig
    code: dict[str, Any]  # where the jobs' code is: {"snapshot": dir} for a remote cluster
    files_here: bool  # whether the jobs' dirs are on this machine's filesystem

    def prepare(self) -> None:
        """Everything needed before the first submission (code, environment); idempotent."""

    def submit(self, tasks: list[job.JobTask], *, folder: str, params: dict, batch: str,
               fence: str) -> dict[str, Any]: ...  # fmt: skip

    def resolve(self, batch: str, fence: str, *, since: float | None = None,
                cancel: bool = False) -> dict[str, Any]: ...  # fmt: skip

    def poll(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def cancel(self, ids: list[str]) -> None: ...

    def fetch(self, remote_dir: str, local_dir: Path) -> None: ...

    def missing(self, paths: list[str]) -> list[str]: ...

    def limits(self, prefix: str) -> tuple[Limits, dict[str, int]]:
        """The user's limits there and usage by jobs not named `prefix...`."""

    def estimate_start(self, params: dict) -> float | None:
        """When Slurm would start a job of these sbatch parameters submitted now (epoch)."""

    def reserved_nodes(self, params: dict) -> dict[str, list[float]]:
        """The nodes a reservation covers, now or later: name -> [from, until], when a job of
        these sbatch parameters cannot start on it (epoch): its limit would run into it."""

    def others_time_used(self, partition: str | None) -> float | None:
        """The median share of their time limit other users' jobs that ended there lately used
        (sacct); None where that is not known."""


def retry(call: Callable[[], T], delays: tuple[float, ...] = RETRY_DELAYS_S) -> T:
    for delay in delays:
        try:
            return call()
        except remote.RemoteError:
            clock.sleep(delay)
    return call()


def answer(out: str, command: str, *, pickled: bool = False) -> Any:
    """The agent's answer (its last marked line); anything else is an unknown outcome (for a
    submission: not a refusal)."""
    mark = agent.ANSWER.decode()
    lines = [line[len(mark) :] for line in out.splitlines() if line.startswith(mark)]
    try:
        if pickled:
            return cloudpickle.loads(base64.b64decode(lines[-1]))
        return json.loads(lines[-1])
    except Exception:  # noqa: BLE001 - no answer, or a torn one: the same to the caller
        raise remote.RemoteError(command=command, login=None, returncode=0, stderr=out[-2000:],
                                 reason="no readable answer from the agent") from None  # fmt: skip


class LocalBackend:
    files_here = True

    def __init__(self, cluster: ClusterConfig):
        self.cluster = cluster
        self.code: dict[str, Any] = {}

    def prepare(self) -> None:
        pass  # the code is this process's own

    def submit(self, tasks, *, folder, params, batch, fence):
        return {"ids": agent.submit(tasks, folder=folder, params=params, slurm=False)}

    def resolve(self, batch, fence, *, since=None, cancel=False):
        return {"ids": []}  # a `local` job is started by the submit call itself: no sbatch

    def poll(self, request):
        return agent.poll(request, slurm=False)

    def cancel(self, ids):
        agent.cancel(ids, slurm=False)

    def fetch(self, remote_dir, local_dir):
        pass

    def missing(self, paths):
        return agent.missing_paths(paths)

    def limits(self, prefix):
        return Limits(), {}  # this machine's own processes: none

    def estimate_start(self, params):
        return None  # no queue: a local job starts when a slot frees

    def reserved_nodes(self, params):
        return {}

    def others_time_used(self, partition):
        return None


class AgentBackend:
    def __init__(
        self, cluster: ClusterConfig, *, code_root: Path, timeout_s: float, over_ssh: bool
    ):
        self.cluster = cluster
        self.code_root = code_root
        self.timeout = timeout_s
        self.over_ssh = over_ssh
        self.files_here = not over_ssh
        self.code: dict[str, Any] = {}

    def _ssh(self, argv: list[str], **kw):
        c = self.cluster
        try:
            return remote.run(argv, login=c.login, ssh_options=c.ssh_options,
                              timeout=self.timeout, **kw)  # fmt: skip
        except remote.RemoteError as e:
            if e.returncode is None:
                # Timed out: the shared connection may hold a dead TCP session (a laptop that
                # slept, a VPN that changed) that every call would wait on. Drop it; the next
                # call opens a fresh one.
                remote.close_master(c.login, c.ssh_options, timeout=5)
            raise

    def _environment(self) -> str:
        """The agent's shell prelude: the cluster's `env` (e.g. SLURM_CONF), the environment
        dir, the snapshot as working dir (jobs submitted from there run its code)."""
        env = {**self.cluster.env, "UV_PROJECT_ENVIRONMENT": self.code["env_dir"]}
        exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())
        return exports + f"cd {shlex.quote(self.code['snapshot'])}"

    def prepare(self) -> None:
        if self.code or not self.over_ssh:
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
        version = "import sys; print('python-version %d.%d' % sys.version_info[:2])"
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
        found = [line.split()[-1] for line in out if line.startswith("python-version ")]
        if not found or found[-1] != here:
            self.code = {}
            raise UserError(
                f"cluster {c.name}: `{c.python}` is Python {found[-1] if found else '?'}, this "
                f"machine runs {here}; jobs are pickled here and must load there: set the "
                f"cluster's `python:` (or pin the version in its `setup:`) to Python {here}"
            )

    def _agent(self, args: list[str], stdin: bytes | None = None) -> str:
        if not self.over_ssh:  # the cluster's Slurm answers here: the agent runs here
            argv = [sys.executable, "-m", "lingua_sweep.sweep.agent", *args]
            # A submission past its deadline is left to finish (behind its fence), as one on a
            # login node goes on when its ssh is cut.
            abandon = args[0] == "submit"
            return remote.run(argv, login=None, env=self.cluster.env, timeout=self.timeout,
                              input=stdin, abandon_on_timeout=abandon).stdout  # fmt: skip
        self.prepare()  # a no-op once the sweep's snapshot is known (recorded in the journal)
        command = (
            f"{self._environment()} && "
            f"{self.cluster.python} -m lingua_sweep.sweep.agent {shlex.join(args)}"
        )
        return self._ssh(["bash", "-lc", command], input=stdin).stdout

    def submit(self, tasks, *, folder, params, batch, fence):
        """Not retried: a second sbatch is what the fence exists to prevent. An exception means
        the outcome is unknown; `resolve` settles it."""
        blob = base64.b64encode(cloudpickle.dumps(tasks))
        args = ["submit", "--folder", folder, "--params", json.dumps(params), "--batch", batch,
                "--fence", fence]  # fmt: skip
        return answer(self._agent(args, blob), "agent submit")

    def resolve(self, batch, fence, *, since=None, cancel=False):
        args = ["resolve", "--batch", batch, "--fence", fence]
        args += ["--since", str(since)] if since else []
        args += ["--cancel"] if cancel else []
        return retry(lambda: answer(self._agent(args), "agent resolve"))

    def poll(self, request):
        def call():
            out = self._agent(["poll"], json.dumps(request).encode())
            return answer(out, "agent poll", pickled=True)

        return retry(call)

    def cancel(self, ids):
        if ids:
            retry(lambda: self._agent(["cancel", "--jobs", ",".join(ids)]))

    def fetch(self, remote_dir, local_dir):
        """Brings a job's small outputs home (metrics, configs, status), not its checkpoints."""
        if not self.over_ssh:
            return  # outputs are already on this filesystem
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
        if not self.over_ssh:
            return agent.missing_paths(paths)
        return answer(self._agent(["check", "--paths", json.dumps(paths)]), "agent check")

    def limits(self, prefix):
        c = self.cluster
        args = ["limits", "--prefix", prefix, *(["--qos", c.qos] if c.qos else []),
                *(["--account", c.account] if c.account else [])]  # fmt: skip
        reply = retry(lambda: answer(self._agent(args), "agent limits"))
        return Limits.from_json(reply["limits"]), reply["usage"]

    def estimate_start(self, params):
        reply = answer(self._agent(["estimate", "--params", json.dumps(params)]), "agent estimate")
        return reply["start"]

    def reserved_nodes(self, params):
        reply = answer(self._agent(["reserved", "--params", json.dumps(params)]), "agent reserved")
        return reply["reserved"]

    def others_time_used(self, partition):
        args = ["time-used", *(["--partition", partition] if partition else [])]
        return answer(self._agent(args), "agent time-used")["time_used"]


def make_backend(
    cluster: ClusterConfig, *, here: ClusterConfig | None, code_root: Path, timeout_s: float
) -> Backend:
    if cluster.simulated is not None:
        from lingua_sweep.sweep.sim_backend import SimBackend

        return SimBackend(cluster)
    if not cluster.slurm:
        return LocalBackend(cluster)
    over_ssh = cluster.login is not None and not (
        here is not None and here.slurm and here.login == cluster.login
    )
    return AgentBackend(cluster, code_root=code_root, timeout_s=timeout_s, over_ssh=over_ssh)
