"""A real two-cluster Slurm testbed on this machine, for the tests and for trying sweeps by hand.

    .venv/bin/python tests/slurm_testbed.py start|stop|status [--dir DIR]

It runs, as root and on loopback only, everything a small Slurm site has:

- munged (own key and socket), mariadbd (private datadir) and one slurmdbd for accounting;
- cluster `alpha`: slurmctld + 4 slurmd, used locally via its own SLURM_CONF. Partition `batch`
  (alpha1, alpha2) takes CPU jobs of up to 2 nodes; partition `gpus` (alpha3, alpha4) has nodes
  that advertise 4 GPUs each (gres on character devices that alias /dev/null: Slurm schedules
  and counts them, nothing can compute on them, so jobs there still train on CPU);
- cluster `beta`: slurmctld + 2 slurmd (beta1, beta2), reached only through a real sshd on
  127.0.0.1 whose sessions get SLURM_CONF=beta's slurm.conf (so `ssh beta-hn sinfo` is "the login
  node of beta"). `<state>/ssh_config` defines the `beta-hn` alias with a generated key.

Shared-cluster shapes: partition `urgent` (over each cluster's batch nodes) preempts `batch`
(alpha: PreemptMode=CANCEL, beta: REQUEUE; 10 s GraceTime); limits are enforced
(AccountingStorageEnforce) and QOS `capped` is root's to use, limits set by the tests that use
it; `set_slurm_conf` changes a setting such as MaxArraySize and restarts that slurmctld.

Every node declares 8 CPUs, whatever the machine has, so a job may run 8 tasks per node. Node
names resolve to 127.0.0.1 while the testbed runs, through a marked block in /etc/hosts, as they
do on a real cluster: torch's rendezvous dials the job's first node by name.

Every daemon runs in the foreground as our child, so its pid is known; `stop` cancels the jobs
through Slurm, kills exactly the recorded pids and removes its /etc/hosts block.
`<state>/conf/cluster/{alpha,alpha-gpu,beta}.yaml` are cluster definitions for
`load_clusters(extra_dirs=[<state>/conf])` or a Hydra searchpath; alpha-gpu is alpha's `gpus`
partition. LINGUA_TESTBED_DIR and LINGUA_TESTBED_PORT_BASE move a second testbed out of the way
of the default one.
"""

import argparse
import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

DEFAULT_DIR = Path(os.environ.get("LINGUA_TESTBED_DIR", "/tmp/lingua_sweep_testbed"))
# Below Linux's ephemeral range (32768+), so an outgoing connection never holds one of them.
PORT_BASE = int(os.environ.get("LINGUA_TESTBED_PORT_BASE", "27140"))
PORTS = {
    "mariadb": PORT_BASE,
    "slurmdbd": PORT_BASE + 1,
    "sshd": PORT_BASE + 2,
    "alpha": PORT_BASE + 10,  # slurmctld; its nodes use +11, +12, ...
    "beta": PORT_BASE + 20,
}
CPU_PARTITION = "batch"  # on both clusters; the default one
# Not `gpu`: test_clusters uses that name for a partition that does not exist.
GPU_PARTITION = "gpus"  # alpha only
# `urgent` covers the CPU nodes of a cluster and preempts `batch` there (partition_prio), as a
# shared cluster's high-priority partition does to its scavenger one: on alpha the preempted job
# is cancelled (ends PREEMPTED), on beta Slurm requeues it.
URGENT_PARTITION = "urgent"
PARTITIONS = {
    "alpha": {
        CPU_PARTITION: ["alpha1", "alpha2"], GPU_PARTITION: ["alpha3", "alpha4"],
        URGENT_PARTITION: ["alpha1", "alpha2"],
    },
    "beta": {CPU_PARTITION: ["beta1", "beta2"], URGENT_PARTITION: ["beta1", "beta2"]},
}  # fmt: skip
PREEMPT_MODE = {"alpha": "CANCEL", "beta": "REQUEUE"}  # of each cluster's `batch` partition
PREEMPT_GRACE_S = 10  # SIGTERM, then this long to checkpoint, then SIGKILL
# A QOS with the per-user limits of a shared cluster (MaxJobsPerUser etc. set by the test that
# uses it); root's association may use it, jobs use it only when they ask (`--qos=capped`).
CAPPED_QOS = "capped"
NODES = {
    c: list(dict.fromkeys(n for nodes in parts.values() for n in nodes))
    for c, parts in PARTITIONS.items()
}
GPU_NODES = PARTITIONS["alpha"][GPU_PARTITION]
GPUS_PER_NODE = 4
CPUS_PER_NODE = 8
BETA_LOGIN = "beta-hn"
HOSTS = Path("/etc/hosts")
HOSTS_MARK = "# lingua_sweep testbed"
PACKAGES = "slurm-wlm slurmdbd munge mariadb-server openssh-server openssh-client rsync"
COMMANDS = [
    "munged", "mariadbd", "mariadb-install-db", "mariadb", "mariadb-admin", "slurmdbd",
    "slurmctld", "slurmd", "sacctmgr", "sinfo", "scontrol", "squeue", "scancel", "sshd", "ssh",
    "ssh-keygen", "rsync",
]  # fmt: skip


@dataclass(kw_only=True)
class Testbed:
    state_dir: Path
    alpha_slurm_conf: Path
    beta_slurm_conf: Path
    ssh_config: Path  # defines Host beta-hn
    conf_dir: Path  # a Hydra searchpath root: conf_dir/cluster/{alpha,alpha-gpu,beta}.yaml
    beta_login: str = BETA_LOGIN
    node_names: tuple[str, ...] = tuple(n for nodes in NODES.values() for n in nodes)
    cpu_partition: str = CPU_PARTITION  # alpha's and beta's: 2 nodes each
    cpus_per_node: int = CPUS_PER_NODE
    # alpha-gpu: alpha's GPU partition as a cluster definition of its own (use env_alpha()).
    gpu_cluster: str = "alpha-gpu"
    gpu_partition: str = GPU_PARTITION
    gpu_nodes: tuple[str, ...] = tuple(GPU_NODES)
    gpus_per_node: int = GPUS_PER_NODE

    @property
    def cluster_conf_dir(self) -> Path:
        return self.conf_dir / "cluster"

    def env_alpha(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.alpha_slurm_conf)}

    def env_beta_local(self) -> dict[str, str]:
        """Beta's tools without ssh (setup and cleanup only; tests should go through ssh)."""
        return {**os.environ, "SLURM_CONF": str(self.beta_slurm_conf)}

    def stop(self) -> None:
        stop(self.state_dir)


def testbed_info(state_dir: Path = DEFAULT_DIR) -> Testbed:
    state_dir = Path(state_dir).resolve()
    return Testbed(
        state_dir=state_dir,
        alpha_slurm_conf=state_dir / "alpha" / "slurm.conf",
        beta_slurm_conf=state_dir / "beta" / "slurm.conf",
        ssh_config=state_dir / "ssh_config",
        conf_dir=state_dir / "conf",
    )


def missing_dependencies() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]


# --- small helpers -------------------------------------------------------------------------


def _exe(name: str) -> str:
    path = shutil.which(name) or str(Path("/usr/sbin", name))
    return path


def _sh(argv: list[str], *, env: dict | None = None, timeout: float = 30, check: bool = True):
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(argv)}` exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    return proc


def _wait(what: str, ready, timeout: float, logs: list[Path] = (), procs=()) -> None:
    """Polls ready() until timeout; fails early (with the logs) if one of procs has died."""
    deadline = time.monotonic() + timeout
    died = []
    while time.monotonic() < deadline and not died:
        if ready():
            return
        died = [f"{exe} (pid {pid})" for pid, exe in procs if not _alive(pid, exe)]
        time.sleep(0.2)
    why = f"{', '.join(died)} exited" if died else f"not ready after {timeout:.0f}s"
    tails = "".join(f"\n--- {p} ---\n{_tail(p)}" for p in logs)
    raise RuntimeError(f"testbed: {what}: {why}{tails}")


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _resolves_to_loopback(host: str) -> bool:
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return False


def _alive(pid: int, exe: str) -> bool:
    """True if pid runs `exe`: a pid file can outlive its process and the pid can be reused."""
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
        target = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    if proc_stat.rsplit(")", 1)[1].split()[0] == "Z":
        _reap(pid)
        return False
    return target == exe


def _reap(pid: int) -> None:
    # Our own children become zombies until waited for (the CLI's children are reparented).
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# --- the processes -------------------------------------------------------------------------


class _Layout:
    """Every path the testbed uses, in one place."""

    def __init__(self, state: Path):
        self.state = state
        self.run = state / "run"  # our pid files: <component>.pid, one line "pid exe"
        self.logs = state / "logs"
        self.munge = state / "munge"
        self.munge_socket = self.munge / "munge.socket.2"
        self.mysql = state / "mysql"
        self.mysql_socket = self.mysql / "mysqld.sock"
        self.dbd = state / "dbd"
        self.ssh = state / "ssh"
        self.ssh_config = state / "ssh_config"
        self.conf = state / "conf"
        self.data = state / "data"

    def slurm_conf(self, cluster: str) -> Path:
        return self.state / cluster / "slurm.conf"

    def env(self, cluster: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf(cluster))}


def _components() -> list[str]:
    """Start order; stop goes in reverse."""
    names = ["munged", "mariadbd", "sshd", "slurmdbd"]
    for cluster, nodes in NODES.items():
        names.append(f"slurmctld-{cluster}")
        names += [f"slurmd-{node}" for node in nodes]
    return names


def _spawn(
    lay: _Layout, name: str, argv: list[str], env: dict | None = None, user: str | None = None
) -> tuple[int, str]:
    """Starts a daemon in the foreground; its pid file holds "pid exe".

    Popen returns only once exec has succeeded, so the pid is the daemon itself (a wrapper such
    as setpriv would exec a second time, and the pid would briefly not look like the daemon).
    """
    log = open(lay.logs / f"{name}.out", "ab")  # noqa: SIM115 (the child keeps it open)
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True,  # survives the CLI that started it and Ctrl-C in pytest
        user=user, group=user, extra_groups=[] if user else None,
    )  # fmt: skip
    log.close()
    _CHILDREN.append(proc)  # keep the Popen alive: no "still running" warning on collection
    exe = os.path.realpath(argv[0])  # Debian's slurmd is an alternatives link to slurmd-wlm
    (lay.run / f"{name}.pid").write_text(f"{proc.pid} {exe}\n")
    return proc.pid, exe


_CHILDREN: list[subprocess.Popen] = []


def _recorded(lay: _Layout) -> dict[str, tuple[int, str]]:
    out = {}
    for name in _components():
        path = lay.run / f"{name}.pid"
        if path.exists():
            pid, exe = path.read_text().split()
            out[name] = (int(pid), exe)
    return out


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _write_configs(lay: _Layout) -> None:
    host = socket.gethostname().split(".")[0]
    for d in (lay.run, lay.logs, lay.mysql, lay.dbd, lay.ssh, lay.data):
        d.mkdir(parents=True, exist_ok=True)

    # munged refuses keys and sockets that others can touch, so its dir belongs to `munge`.
    munge_user = pwd.getpwnam("munge")
    lay.munge.mkdir(exist_ok=True)
    lay.munge.chmod(0o755)  # clients need to reach the socket
    os.chown(lay.munge, munge_user.pw_uid, munge_user.pw_gid)
    key = lay.munge / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    os.chown(key, munge_user.pw_uid, munge_user.pw_gid)
    lay.state.chmod(0o755)  # munge must traverse to its dir

    # Daemons bind to what the hostname resolves to, instead of every interface. Only when that is
    # loopback (as on this dev machine); in a container the hostname is often the bridge address,
    # which clients dialling 127.0.0.1 would not reach. Clients use 127.0.0.1 either way.
    bind = dbd_bind = ""
    if _resolves_to_loopback(host):
        bind = "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny\n"
        dbd_bind = "CommunicationParameters=NoInAddrAny\n"  # undocumented for slurmdbd; honoured
    _write(
        lay.dbd / "slurmdbd.conf",
        f"""\
AuthType=auth/munge
AuthInfo=socket={lay.munge_socket}
DbdHost={host}
DbdAddr=127.0.0.1
DbdPort={PORTS["slurmdbd"]}
{dbd_bind}SlurmUser=root
PidFile={lay.dbd}/slurmdbd.pid
LogFile={lay.logs}/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={PORTS["mariadb"]}
StorageUser=slurm
StorageLoc=slurm_acct_db
""",
        mode=0o600,  # slurmdbd insists: it holds the database password
    )

    for cluster, nodes in NODES.items():
        base = lay.state / cluster
        port = PORTS[cluster]
        node_lines = "".join(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port + 1 + i} "
            f"CPUs={CPUS_PER_NODE} RealMemory=8000 "
            + (f"Gres=gpu:{GPUS_PER_NODE} " if node in GPU_NODES else "")
            + "State=UNKNOWN\n"
            for i, node in enumerate(nodes)
        )
        partition_lines = "".join(
            f"PartitionName={name} Nodes={','.join(members)} "
            f"Default={'YES' if name == CPU_PARTITION else 'NO'} MaxTime=INFINITE State=UP "
            + {
                CPU_PARTITION: f"PriorityTier=1 PreemptMode={PREEMPT_MODE[cluster]} "
                f"GraceTime={PREEMPT_GRACE_S}",
                URGENT_PARTITION: "PriorityTier=10 PreemptMode=OFF",
            }.get(name, "PriorityTier=1 PreemptMode=OFF")
            + "\n"
            for name, members in PARTITIONS[cluster].items()
        )
        gres = ""
        if any(node in GPU_NODES for node in nodes):
            # Accounted as a TRES, so a QOS can cap GPUs per user (MaxTRESPerUser=gres/gpu=N).
            gres = "GresTypes=gpu\nAccountingStorageTRES=gres/gpu\n"
            _write_gres_conf(base, [node for node in nodes if node in GPU_NODES])
        for d in ("ctld", "log", *(f"spool/{node}" for node in nodes)):
            (base / d).mkdir(parents=True, exist_ok=True)
        _write(
            lay.slurm_conf(cluster),
            f"""\
ClusterName={cluster}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={lay.munge_socket}
CredType=cred/munge
{bind}StateSaveLocation={base}/ctld
SlurmctldPidFile={base}/slurmctld.pid
SlurmctldLogFile={base}/log/slurmctld.log
# Several slurmd on one host: %n keeps their pid files and spools apart.
SlurmdSpoolDir={base}/spool/%n
SlurmdPidFile={base}/spool/slurmd-%n.pid
SlurmdLogFile={base}/log/slurmd-%n.log
# No cgroups in containers: track processes by /proc and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
# Backfill (which also preempts) every 2 s, not 30: tests wait for it.
SchedulerParameters=bf_interval=2
# Nodes advertise 8 CPUs / 8 GB whatever the machine has, so 8 tasks per node fit.
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
KillWait=2
InactiveLimit=0
MinJobAge=300
SlurmdTimeout=60
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={PORTS["slurmdbd"]}
# With munge, this names the munge socket used to talk to slurmdbd (AuthInfo is not used there).
AccountingStoragePass={lay.munge_socket}
JobCompType=jobcomp/none
# Limits (QOS and association) are enforced, as on a shared cluster.
AccountingStorageEnforce=associations,limits,qos
{gres}{node_lines}{partition_lines}""",
        )

    _write_ssh(lay)
    _write_cluster_yamls(lay)


def _write_gres_conf(base: Path, gpu_nodes: list[str]) -> None:
    """gres.conf (read from beside slurm.conf) with GPUs that are stand-ins for /dev/nvidiaN.

    slurmd insists that a GPU's File is a character device, so each is a node with /dev/null's
    numbers (1, 3): harmless to open, useless to compute on.
    """
    lines = ["AutoDetect=off\n"]  # no NVML probing of the real machine
    for node in gpu_nodes:
        dev = base / "dev" / node
        dev.mkdir(parents=True, exist_ok=True)
        for i in range(GPUS_PER_NODE):
            path = dev / f"nvidia{i}"
            if not path.is_char_device():
                path.unlink(missing_ok=True)
                os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        lines.append(f"NodeName={node} Name=gpu File={dev}/nvidia[0-{GPUS_PER_NODE - 1}]\n")
    _write(base / "gres.conf", "".join(lines))


def _write_ssh(lay: _Layout) -> None:
    host_key = lay.ssh / "ssh_host_ed25519_key"
    client_key = lay.ssh / "id_ed25519"
    for key in (host_key, client_key):
        if not key.exists():
            _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lingua-testbed",
                 "-f", str(key)])  # fmt: skip
    _write(lay.ssh / "authorized_keys", (client_key.with_suffix(".pub")).read_text(), 0o600)
    _write(
        lay.ssh / "sshd_config",
        f"""\
Port {PORTS["sshd"]}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {lay.ssh}/sshd.pid
AuthorizedKeysFile {lay.ssh}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The keys live under /tmp, which StrictModes rejects (world-writable parent).
StrictModes no
MaxStartups 100:30:200
Subsystem sftp internal-sftp
# This sshd is beta's login node: plain sinfo/sbatch/sacct talk to beta.
SetEnv SLURM_CONF={lay.slurm_conf("beta")}
""",
    )
    _write(
        lay.ssh_config,
        f"""\
Host {BETA_LOGIN}
  HostName 127.0.0.1
  Port {PORTS["sshd"]}
  User root
  IdentityFile {client_key}
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile {lay.ssh}/known_hosts
  LogLevel ERROR
""",
    )


def _write_cluster_yamls(lay: _Layout) -> None:
    common = {
        "provider": "testbed",
        "partition": CPU_PARTITION,
        "gpus_per_node": 0,
        "gpu_type": "cpu",
        "max_nodes": 2,
        "data_root": str(lay.data),
        "python": os.path.abspath(sys.executable),  # the venv's python, symlink kept
        "probe_timeout_s": 10.0,
    }
    alpha = {
        "name": "alpha",
        "login": None,
        **common,
        "output_root": str(lay.state / "outputs" / "alpha"),
        "priority": 10,
        "env": {"SLURM_CONF": str(lay.slurm_conf("alpha"))},  # its Slurm commands find it
    }
    # The same Slurm as alpha; its GPUs are stand-ins, so it is nominally a cpu cluster too.
    alpha_gpu = {
        **alpha,
        "name": "alpha-gpu",
        "partition": GPU_PARTITION,
        "gpus_per_node": GPUS_PER_NODE,
        "max_nodes": len(GPU_NODES),
        "output_root": str(lay.state / "outputs" / "alpha-gpu"),
        "priority": 15,
    }
    beta = {
        "name": "beta",
        "login": BETA_LOGIN,
        "ssh_options": ["-F", str(lay.ssh_config)],
        **common,
        "output_root": str(lay.state / "outputs" / "beta"),
        "remote_code_dir": str(lay.state / "beta" / "code"),
        "priority": 20,
    }
    for cfg in (alpha, alpha_gpu, beta):
        text = yaml.safe_dump({"defaults": ["cluster_schema", "_self_"], **cfg}, sort_keys=False)
        _write(lay.conf / "cluster" / f"{cfg['name']}.yaml", text)
        Path(cfg["output_root"]).mkdir(parents=True, exist_ok=True)


def _start_munged(lay: _Layout) -> None:
    proc = _spawn(lay, "munged", [
        _exe("munged"), "-F",
        f"--socket={lay.munge_socket}", f"--key-file={lay.munge}/munge.key",
        f"--pid-file={lay.munge}/munged.pid", f"--log-file={lay.munge}/munged.log",
        f"--seed-file={lay.munge}/munged.seed",
    ], user="munge")  # fmt: skip
    _wait("munged", lay.munge_socket.exists, 15, [lay.logs / "munged.out"], [proc])


def _start_mariadb(lay: _Layout) -> None:
    datadir = lay.mysql / "data"
    if not (datadir / "mysql").exists():
        shutil.rmtree(datadir, ignore_errors=True)
        argv = [_exe("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", "--user=root",
                "--auth-root-authentication-method=socket", "--skip-test-db"]  # fmt: skip
        _sh(argv, timeout=120)
    proc = _spawn(lay, "mariadbd", [
        _exe("mariadbd"), "--no-defaults", f"--datadir={datadir}", f"--socket={lay.mysql_socket}",
        f"--port={PORTS['mariadb']}", "--bind-address=127.0.0.1", "--user=root",
        f"--pid-file={lay.mysql}/mariadbd.pid", f"--log-error={lay.logs}/mariadbd.log",
        "--skip-name-resolve", "--skip-log-bin", "--innodb-buffer-pool-size=64M",
        "--innodb-use-native-aio=0",  # no native AIO in sandboxed kernels (gVisor)
    ])  # fmt: skip

    def ping() -> bool:
        argv = ["mariadb-admin", "--no-defaults", f"--socket={lay.mysql_socket}", "ping"]
        return _sh(argv, check=False, timeout=10).returncode == 0

    _wait("mariadbd", ping, 60, [lay.logs / "mariadbd.log"], [proc])
    sql = (
        "CREATE DATABASE IF NOT EXISTS slurm_acct_db;"
        # No password at all: the database is private to the testbed and bound to loopback.
        "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1';"
        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    )
    _sh(["mariadb", "--no-defaults", f"--socket={lay.mysql_socket}", "-e", sql])


def _start_sshd(lay: _Layout) -> tuple[int, str]:
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    sshd = _exe("sshd")  # must be absolute: sshd re-executes itself
    argv = [sshd, "-D", "-f", str(lay.ssh / "sshd_config"), "-E", str(lay.logs / "sshd.log")]
    return _spawn(lay, "sshd", argv)


def _start_slurmdbd(lay: _Layout) -> None:
    # slurmdbd looks for slurmdbd.conf next to $SLURM_CONF (no slurm.conf needed there).
    env = {**os.environ, "SLURM_CONF": str(lay.dbd / "slurm.conf")}
    proc = _spawn(lay, "slurmdbd", [_exe("slurmdbd"), "-D"], env)

    def clusters() -> bool:
        argv = ["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"]
        return _sh(argv, env=lay.env("alpha"), check=False, timeout=10).returncode == 0

    logs = [lay.logs / "slurmdbd.log", lay.logs / "slurmdbd.out"]
    _wait("slurmdbd", clusters, 60, logs, [proc])
    argv = ["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"]
    known = set(_sh(argv, env=lay.env("alpha")).stdout.split())
    for cluster in NODES:
        if cluster not in known:
            _sh(["sacctmgr", "-i", "add", "cluster", cluster], env=lay.env("alpha"))
    argv = ["sacctmgr", "-n", "-P", "show", "qos", "format=name"]
    if CAPPED_QOS not in _sh(argv, env=lay.env("alpha")).stdout.split():
        _sh(["sacctmgr", "-i", "add", "qos", CAPPED_QOS], env=lay.env("alpha"))
        _sh(["sacctmgr", "-i", "modify", "user", "where", "name=root", "set",
             f"qos+={CAPPED_QOS}"], env=lay.env("alpha"))  # fmt: skip


def _start_cluster(lay: _Layout, cluster: str) -> list[tuple[int, str]]:
    env = lay.env(cluster)
    procs = [_spawn(lay, f"slurmctld-{cluster}", [_exe("slurmctld"), "-D"], env)]
    for node in NODES[cluster]:
        procs.append(_spawn(lay, f"slurmd-{node}", [_exe("slurmd"), "-D", "-N", node], env))
    return procs


def _node_states(lay: _Layout, cluster: str) -> dict[str, str]:
    argv = ["sinfo", "--noheader", "--Node", "--format=%N %t"]
    proc = _sh(argv, env=lay.env(cluster), check=False, timeout=10)
    if proc.returncode != 0:
        return {}
    return dict(line.split() for line in proc.stdout.splitlines() if line.strip())


def _all_idle(lay: _Layout) -> bool:
    return all(
        _node_states(lay, c) == {node: "idle" for node in nodes} for c, nodes in NODES.items()
    )


def _ssh_ok(lay: _Layout) -> bool:
    argv = ["ssh", "-F", str(lay.ssh_config), "-o", "ConnectTimeout=5", BETA_LOGIN,
            "sinfo --noheader --format=%t"]  # fmt: skip
    proc = _sh(argv, check=False, timeout=15)
    return proc.returncode == 0 and proc.stdout.split() == ["idle"]


def _healthy(lay: _Layout) -> bool:
    rec = _recorded(lay)
    if set(rec) != set(_components()) or not all(_alive(*r) for r in rec.values()):
        return False
    return all(len(_node_states(lay, c)) == len(n) for c, n in NODES.items())


# --- node names in /etc/hosts --------------------------------------------------------------


def _hosts_block(state: Path) -> list[str]:
    # The state dir in the markers keeps two testbeds' blocks (default and private) apart.
    names = " ".join(n for nodes in NODES.values() for n in nodes)
    return [f"{HOSTS_MARK} begin {state}\n", f"127.0.0.1 {names}\n", f"{HOSTS_MARK} end {state}\n"]


def _without_block(lines: list[str], state: Path) -> list[str]:
    """lines minus this testbed's block (markers included); every other line as it was.

    A begin marker with no end marker after it is left alone, and so is all that follows it.
    """
    begin, end = f"{HOSTS_MARK} begin {state}", f"{HOSTS_MARK} end {state}"
    bare = [line.rstrip("\r\n") for line in lines]
    out, i = [], 0
    while i < len(lines):
        if bare[i] == begin and end in bare[i + 1 :]:
            i = bare.index(end, i + 1) + 1
            continue
        out.append(lines[i])
        i += 1
    return out


def add_hosts_entries(state: Path, hosts: Path = HOSTS) -> None:
    """Makes the node names resolve to 127.0.0.1; idempotent."""
    with _hosts_lock():
        lines = hosts.read_text().splitlines(keepends=True)
        kept = _without_block(lines, state)
        if kept and not kept[-1].endswith("\n"):
            kept[-1] += "\n"
        new = kept + _hosts_block(state)
        if new != lines:
            _replace_text(hosts, "".join(new))


def remove_hosts_entries(state: Path, hosts: Path = HOSTS) -> None:
    """Removes exactly the block add_hosts_entries wrote; a no-op without one."""
    if not hosts.exists():
        return
    with _hosts_lock():
        lines = hosts.read_text().splitlines(keepends=True)
        kept = _without_block(lines, state)
        if kept != lines:
            _replace_text(hosts, "".join(kept))


@contextlib.contextmanager
def _hosts_lock():
    # Not a lock on /etc/hosts itself: the rename below swaps that file for a new one.
    with open(Path(tempfile.gettempdir()) / "lingua_sweep_testbed_hosts.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _replace_text(path: Path, text: str) -> None:
    """Writes a sibling and renames it over path, so a reader never sees half a file.

    Containers often bind-mount /etc/hosts, and a mount point cannot be renamed over: then
    the file is rewritten in place.
    """
    st = path.stat()
    tmp = path.with_name(f".{path.name}.lingua_sweep.tmp")
    try:
        tmp.write_text(text)
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
        return
    except OSError:
        tmp.unlink(missing_ok=True)
    with open(path, "r+") as f:
        f.write(text)
        f.truncate()


@contextlib.contextmanager
def _lock(state: Path):
    """One start/stop at a time, across processes (parallel pytest sessions)."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# --- the API -------------------------------------------------------------------------------


def is_running(state_dir: Path = DEFAULT_DIR) -> bool:
    return _healthy(_Layout(testbed_info(state_dir).state_dir))


def start(state_dir: Path = DEFAULT_DIR, *, timeout: float = 120) -> Testbed:
    """Starts both clusters (or reuses running ones) and returns once every node is idle."""
    info = testbed_info(state_dir)
    lay = _Layout(info.state_dir)
    if os.geteuid() != 0:
        raise RuntimeError("the Slurm testbed runs daemons as root; run as root")
    missing = missing_dependencies()
    if missing:
        raise RuntimeError(
            f"testbed needs {', '.join(missing)}: run tests/install_system_deps.sh "
            f"(Debian: {PACKAGES})"
        )
    with _lock(lay.state):
        if _healthy(lay):
            add_hosts_entries(lay.state)  # in case something rewrote /etc/hosts since
            return info
        _stop(lay)  # whatever is left of a half-started or crashed testbed
        busy = [f"{n}:{p}" for n, p in _all_ports().items() if not _port_free(p)]
        if busy:
            raise RuntimeError(
                f"testbed ports in use on 127.0.0.1 ({', '.join(busy)}); stop whatever holds "
                "them or set LINGUA_TESTBED_PORT_BASE"
            )
        try:
            _start_all(lay, timeout)
        except BaseException:
            _stop(lay)  # leave no daemons behind; their logs stay in <state>/logs
            raise
    return info


def _start_all(lay: _Layout, timeout: float) -> None:
    _write_configs(lay)
    add_hosts_entries(lay.state)
    _start_munged(lay)
    sshd = _start_sshd(lay)
    _start_mariadb(lay)
    _start_slurmdbd(lay)
    procs = [p for cluster in NODES for p in _start_cluster(lay, cluster)]
    logs = [lay.state / c / "log" / "slurmctld.log" for c in NODES]
    logs += [lay.logs / f"{name}.out" for name in _components() if "slurm" in name]
    _wait("all nodes idle", lambda: _all_idle(lay), timeout, logs, procs)
    _wait("ssh to beta-hn", lambda: _ssh_ok(lay), 30, [lay.logs / "sshd.log"], [sshd])


def _all_ports() -> dict[str, int]:
    ports = dict(PORTS)
    for cluster, nodes in NODES.items():
        for i, node in enumerate(nodes):
            ports[node] = PORTS[cluster] + 1 + i
    return ports


def stop(state_dir: Path = DEFAULT_DIR) -> None:
    lay = _Layout(testbed_info(state_dir).state_dir)
    if not lay.state.exists():
        remove_hosts_entries(lay.state)
        return
    with _lock(lay.state):
        _stop(lay)


def _stop(lay: _Layout) -> None:
    rec = _recorded(lay)
    # Jobs run under slurmstepd, which is not ours to kill: let Slurm end them first.
    for cluster in NODES:
        ctld = rec.get(f"slurmctld-{cluster}")
        if ctld and _alive(*ctld):
            _cancel_all_jobs(lay, cluster)
    for name in reversed(_components()):
        if name in rec:
            _kill(*rec[name])
        (lay.run / f"{name}.pid").unlink(missing_ok=True)
    remove_hosts_entries(lay.state)


def _cancel_all_jobs(lay: _Layout, cluster: str) -> None:
    env = lay.env(cluster)
    _sh(["scancel", "--user=root"], env=env, check=False, timeout=15)

    def no_jobs() -> bool:
        proc = _sh(["squeue", "--noheader", "--format=%i"], env=env, check=False, timeout=10)
        return proc.returncode != 0 or not proc.stdout.strip()

    with contextlib.suppress(RuntimeError):  # stop anyway; the caller kills the daemons
        _wait(f"jobs on {cluster} to end", no_jobs, 30)


def _kill(pid: int, exe: str) -> None:
    if not _alive(pid, exe):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        _reap(pid)
        if not _alive(pid, exe):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        _reap(pid)
        if not _alive(pid, exe):
            return
        time.sleep(0.1)


# --- one daemon at a time, for fault tests -------------------------------------------------

# The daemons that can go away and come back alone; the others only with the whole testbed.
RESTARTABLE = ("sshd", "slurmdbd", *(f"slurmctld-{c}" for c in NODES))


def daemon_pid(name: str, state_dir: Path = DEFAULT_DIR) -> int | None:
    """The pid of the recorded daemon `name` (a component: "sshd", "slurmctld-beta"...) if it
    runs, else None."""
    rec = _recorded(_Layout(testbed_info(state_dir).state_dir)).get(name)
    return rec[0] if rec and _alive(*rec) else None


def stop_daemon(name: str, state_dir: Path = DEFAULT_DIR, *, sig: int = signal.SIGTERM) -> None:
    """Stops one recorded daemon with `sig` (SIGKILL: a crash), SIGKILL after 15 s if it lingers.

    Its pid file stays: `status` shows it dead, `stop` finds nothing to kill. A stopped sshd leaves
    the sessions it serves alone, as a real one does. start_daemon brings it back.
    """
    lay = _Layout(testbed_info(state_dir).state_dir)
    _check_restartable(name)
    with _lock(lay.state):
        rec = _recorded(lay).get(name)
        if rec is None or not _alive(*rec):
            return
        os.kill(rec[0], sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(*rec):
            time.sleep(0.1)
        _kill(*rec)  # a no-op once it is gone


def start_daemon(name: str, state_dir: Path = DEFAULT_DIR, *, timeout: float = 60) -> int:
    """Starts a stopped daemon again with the command `start` uses; returns its pid once it
    answers (sshd: `ssh beta-hn true`; slurmdbd: sacctmgr; a slurmctld: sinfo lists its nodes)."""
    lay = _Layout(testbed_info(state_dir).state_dir)
    _check_restartable(name)
    with _lock(lay.state):
        rec = _recorded(lay).get(name)
        if rec and _alive(*rec):
            raise RuntimeError(f"testbed: {name} already runs (pid {rec[0]})")
        if name == "sshd":
            proc = _start_sshd(lay)
            logs = [lay.logs / "sshd.log"]
            _wait("sshd", lambda: _ssh_answers(lay), timeout, logs, [proc])
        elif name == "slurmdbd":
            _start_slurmdbd(lay)  # waits until sacctmgr answers
        else:
            cluster = name.removeprefix("slurmctld-")
            proc = _spawn(lay, name, [_exe("slurmctld"), "-D"], lay.env(cluster))
            logs = [lay.state / cluster / "log" / "slurmctld.log", lay.logs / f"{name}.out"]
            ready = lambda: len(_node_states(lay, cluster)) == len(NODES[cluster])  # noqa: E731
            _wait(name, ready, timeout, logs, [proc])
        return _recorded(lay)[name][0]


def set_slurm_conf(
    cluster: str, settings: dict[str, str | None], state_dir: Path = DEFAULT_DIR
) -> None:
    """Sets (None: removes) lines of a cluster's slurm.conf and restarts its slurmctld, which
    keeps its jobs (a site changing MaxArraySize, say). Tests restore what they changed."""
    lay = _Layout(testbed_info(state_dir).state_dir)
    path = lay.slurm_conf(cluster)
    lines = [line for line in path.read_text().splitlines()
             if line.split("=", 1)[0] not in settings]  # fmt: skip
    lines += [f"{key}={value}" for key, value in settings.items() if value is not None]
    _replace_text(path, "\n".join(lines) + "\n")
    stop_daemon(f"slurmctld-{cluster}", state_dir)
    start_daemon(f"slurmctld-{cluster}", state_dir)


def _check_restartable(name: str) -> None:
    if name not in RESTARTABLE:
        raise ValueError(f"testbed: {name!r} is not one of {', '.join(RESTARTABLE)}")


def _ssh_answers(lay: _Layout) -> bool:
    """beta-hn accepts a new ssh session (whatever its nodes are doing)."""
    argv = ["ssh", "-F", str(lay.ssh_config), "-o", "ConnectTimeout=5", BETA_LOGIN, "true"]
    return _sh(argv, check=False, timeout=15).returncode == 0


def status(state_dir: Path = DEFAULT_DIR) -> dict:
    lay = _Layout(testbed_info(state_dir).state_dir)
    rec = _recorded(lay)
    procs = {name: {"pid": pid, "alive": _alive(pid, exe)} for name, (pid, exe) in rec.items()}
    nodes = {c: _node_states(lay, c) for c in NODES} if rec else {}
    return {"state_dir": str(lay.state), "processes": procs, "nodes": nodes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state dir")
    args = parser.parse_args(argv)
    if args.action == "start":
        t0 = time.monotonic()
        info = start(args.dir)
        out = {**asdict(info), "start_s": round(time.monotonic() - t0, 1)}
        print(json.dumps(out, indent=2, default=str))
    elif args.action == "stop":
        stop(args.dir)
        print(f"stopped testbed in {args.dir}")
    else:
        print(json.dumps(status(args.dir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
