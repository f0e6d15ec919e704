import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from lingua_sweep.clusters import (
    CLUSTER_DIR,
    ClusterStatus,
    detect_cluster,
    is_slurm_machine,
    load_clusters,
    probe,
    select_cluster,
)
from lingua_sweep.config import ClusterConfig
from lingua_sweep.errors import UserError

# --- the registry --------------------------------------------------------------------------


def test_registry_matches_the_spec():
    clusters = load_clusters()
    assert list(clusters) == ["research-secure", "mk-turbo", "sphinx", "miso", "local"]
    rs, mk, sphinx, miso, local = clusters.values()
    assert (rs.provider, rs.login, rs.partition, rs.max_nodes) == (
        "together", "research-secure-hn", "batch", 4,
    )  # fmt: skip
    assert (mk.login, mk.partition, mk.max_nodes) == ("mk-turbo-hn", "batch", 1)
    assert sorted(mk.exclude) == ["mk-turbo-02", "mk-turbo-08"]
    for c in (rs, mk):
        assert c.data_root == "/data/tkumar/datasets"
        assert c.output_root == "/data/tkumar/lingua-out"
    for c, partition, gpu, max_nodes in ((sphinx, "sphinx", "A100", 2), (miso, "miso", "H100", 1)):
        assert (c.provider, c.login, c.account) == ("stanford", "sc.stanford.edu", "nlp")
        assert (c.partition, c.gpu_type, c.max_nodes) == (partition, gpu, max_nodes)
        assert c.data_root == "/juice5/scr5/nlp/data/huggingface/lingua-data"
        assert c.output_root == "/juice5b/scr5b/tanishq/lingua-out"
    for c in (rs, mk, sphinx, miso):
        assert c.gpus_per_node == 8 and c.slurm
        assert c.python == "$UV_PROJECT_ENVIRONMENT/bin/python"  # the env keyed by uv.lock
        assert any("uv sync" in line for line in c.setup)
    assert not local.slurm and local.login is None and local.output_root == "outputs"


def test_registry_composes_with_hydra_schema():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from lingua_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CLUSTER_DIR.parent), version_base=None):
        for name in load_clusters():
            cfg = compose(config_name=None, overrides=[f"+cluster={name}"])
            assert OmegaConf.get_type(cfg.cluster) is ClusterConfig
            assert cfg.cluster.name == name
        with pytest.raises(ConfigCompositionException, match="gpus_per_nodes"):
            compose(config_name=None, overrides=["+cluster=miso", "cluster.gpus_per_nodes=1"])
        with pytest.raises(ConfigCompositionException, match="max_nodes"):
            compose(config_name=None, overrides=["+cluster=miso", "cluster.max_nodes=abc"])


def test_local_data_root_follows_env(monkeypatch):
    monkeypatch.setenv("LINGUA_SWEEP_DATA", "/somewhere/data")
    assert load_clusters()["local"].data_root == "/somewhere/data"
    monkeypatch.delenv("LINGUA_SWEEP_DATA")
    assert load_clusters()["local"].data_root == "embedded"  # the project's own corpus


def test_bad_definition_is_a_user_error(tmp_path):
    (tmp_path / "typo.yaml").write_text("name: typo\ndata_root: /d\noutput_root: /o\ngpus: 8\n")
    with pytest.raises(UserError, match="typo.yaml"):
        load_clusters([tmp_path])
    (tmp_path / "typo.yaml").write_text("name: other\ndata_root: /d\noutput_root: /o\n")
    with pytest.raises(UserError, match="must match the file name"):
        load_clusters([tmp_path])
    with pytest.raises(UserError, match="does not exist"):
        load_clusters([tmp_path / "nope"])


def test_extra_dir_plain_or_searchpath_root(tmp_path):
    text = "defaults: [cluster_schema, _self_]\nname: extra\ndata_root: /d\noutput_root: /o\n"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "extra.yaml").write_text(text + "priority: 1\n")
    (tmp_path / "root" / "cluster").mkdir(parents=True)
    (tmp_path / "root" / "cluster" / "extra.yaml").write_text(text)
    assert list(load_clusters([tmp_path / "plain"]))[0] == "extra"  # priority 1 comes first
    assert "extra" in load_clusters([tmp_path / "root"])


# --- detection -----------------------------------------------------------------------------


@pytest.fixture
def registry():
    return load_clusters()


def test_detect_env_var_wins(registry):
    env = {"LINGUA_CLUSTER": "miso", "SLURM_CLUSTER_NAME": "sphinx"}
    assert detect_cluster(registry, env, hostname="mk-turbo-05") == "miso"
    with pytest.raises(UserError, match="LINGUA_CLUSTER='nope'.*research-secure, mk-turbo"):
        detect_cluster(registry, {"LINGUA_CLUSTER": "nope"}, hostname="x")


def test_detect_from_slurm_env(registry):
    assert detect_cluster(registry, {"SLURM_CLUSTER_NAME": "mk-turbo"}, hostname="x") == "mk-turbo"
    # One Slurm cluster, two partitions: the job's partition tells sphinx from miso.
    env = {"SLURM_CLUSTER_NAME": "sc", "SLURM_JOB_PARTITION": "miso"}
    assert detect_cluster(registry, env, hostname="x") == "miso"
    # `batch` belongs to both Together clusters, so the hostname decides.
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_PARTITION": "batch"}
    assert detect_cluster(registry, env, hostname="research-secure-12") == "research-secure"


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("research-secure-03", "research-secure"),
        ("mk-turbo-05.cluster.internal", "mk-turbo"),
        ("sphinx7.stanford.edu", "sphinx"),
        ("miso-2", "miso"),
        ("sc", "sphinx"),  # the shared login node; same filesystems as miso
    ],
)
def test_detect_from_hostname(registry, hostname, expected):
    assert detect_cluster(registry, {}, hostname=hostname, slurm_machine=True) == expected


def test_detect_unknown(registry, tmp_path):
    assert detect_cluster(registry, {}, hostname="laptop", slurm_machine=False) == "local"
    with pytest.raises(UserError, match="LINGUA_CLUSTER") as e:
        detect_cluster(registry, {}, hostname="laptop", slurm_machine=True)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="SLURM_CLUSTER_NAME='other'"):
        detect_cluster(registry, {"SLURM_CLUSTER_NAME": "other"}, hostname="n1")


def test_is_slurm_machine(tmp_path):
    no_conf = tmp_path / "slurm.conf"
    assert not is_slurm_machine({}, no_conf)
    assert is_slurm_machine({"SLURM_JOB_ID": "3"}, no_conf)
    # An exported SLURM_CONF (a laptop talking to some cluster) does not make it a Slurm node.
    assert not is_slurm_machine({"SLURM_CONF": "/x/slurm.conf"}, no_conf)
    no_conf.write_text("ClusterName=x\n")
    assert is_slurm_machine({}, no_conf)


# --- selection -----------------------------------------------------------------------------


def _status(name, state, idle, total=4):
    return ClusterStatus(
        name=name, state=state, idle_nodes=idle, total_nodes=total, reason=None, elapsed_s=0.0
    )


def test_select_cluster_priority_and_size(registry):
    statuses = [
        _status("local", "local", 1, 1),
        _status("miso", "idle", 1),
        _status("mk-turbo", "idle", 3),
        _status("research-secure", "busy", 0),
    ]
    assert select_cluster(statuses, registry) == "mk-turbo"
    # mk-turbo allows 1 node, miso too: a 2-node job needs sphinx (unreachable here) or nothing.
    assert select_cluster(statuses, registry, nodes=2) is None
    statuses.append(_status("sphinx", "idle", 2))
    assert select_cluster(statuses, registry, nodes=2) == "sphinx"
    assert select_cluster(statuses, list(registry.values()), nodes=3) is None
    assert select_cluster([_status("research-secure", "unreachable", 0)], registry) is None
    assert select_cluster([_status("local", "local", 1, 1)], registry) == "local"


# --- probing the real testbed --------------------------------------------------------------

slurm = pytest.mark.slurm


@pytest.fixture
def testbed_clusters(slurm_testbed):
    """alpha and beta as defined by the testbed; alpha's tools find it through the SLURM_CONF
    of its `env`, this process's own environment untouched."""
    clusters = load_clusters([slurm_testbed.conf_dir])
    assert clusters["alpha"].env == {"SLURM_CONF": str(slurm_testbed.alpha_slurm_conf)}
    return clusters


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections and never says a word: ssh hangs on it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


def _dead_port() -> int:
    with socket.socket() as s:  # bound and closed: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake(base: ClusterConfig, name: str, port: int) -> ClusterConfig:
    return dataclasses.replace(
        base, name=name, login="127.0.0.1",
        ssh_options=["-F", "/dev/null", "-p", str(port), "-o", "StrictHostKeyChecking=no",
                     "-o", "UserKnownHostsFile=/dev/null"],
    )  # fmt: skip


def _wait_idle(cluster: ClusterConfig, idle: int, timeout: float = 20) -> ClusterStatus:
    deadline = time.monotonic() + timeout
    while True:
        (status,) = probe([cluster], timeout_s=10)
        if status.idle_nodes == idle or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


@slurm
def test_testbed_definitions_compose_with_hydra(slurm_testbed):
    from hydra import compose, initialize_config_dir

    from lingua_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(slurm_testbed.conf_dir), version_base=None):
        beta = compose(config_name=None, overrides=["+cluster=beta"]).cluster
    assert beta.login == "beta-hn" and beta.ssh_options == ["-F", str(slurm_testbed.ssh_config)]
    assert beta.remote_code_dir.startswith(str(slurm_testbed.state_dir))


@slurm
def test_probe_testbed_both_idle(testbed_clusters):
    alpha, beta = testbed_clusters["alpha"], testbed_clusters["beta"]
    statuses = probe([alpha, beta], timeout_s=10)
    assert [(s.name, s.state, s.idle_nodes, s.total_nodes) for s in statuses] == [
        ("alpha", "idle", 2, 2),
        ("beta", "idle", 2, 2),
    ]
    assert all(s.reason is None and s.elapsed_s < 10 for s in statuses)


@slurm
def test_beta_is_only_reachable_over_ssh(testbed_clusters, monkeypatch):
    beta = testbed_clusters["beta"]
    assert beta.login == "beta-hn"
    monkeypatch.delenv("SLURM_CONF", raising=False)
    # Without ssh, this machine has no Slurm config of its own: the ssh path is what works.
    (local,) = probe([dataclasses.replace(beta, login=None)], timeout_s=10)
    assert local.state == "unreachable"
    (remote,) = probe([beta], timeout_s=10)
    assert (remote.state, remote.idle_nodes) == ("idle", 2)


@slurm
def test_idle_count_follows_jobs(slurm_testbed, testbed_clusters, tmp_path):
    alpha = testbed_clusters["alpha"]
    assert _wait_idle(alpha, 2).idle_nodes == 2
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--output=/dev/null", f"--chdir={tmp_path}",
         "--wrap", "sleep 60"],
        env=slurm_testbed.env_alpha(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        held = _wait_idle(alpha, 1)
        assert (held.state, held.idle_nodes, held.total_nodes) == ("idle", 1, 2)
    finally:
        subprocess.run(["scancel", job], env=slurm_testbed.env_alpha(), timeout=30, check=True)
    assert _wait_idle(alpha, 2).idle_nodes == 2


@slurm
def test_excluded_idle_node_is_not_counted(testbed_clusters):
    alpha = dataclasses.replace(testbed_clusters["alpha"], exclude=["alpha2"])
    beta = dataclasses.replace(testbed_clusters["beta"], exclude=["beta1", "beta2"])
    a, b = probe([alpha, beta], timeout_s=10)
    assert (a.state, a.idle_nodes, a.total_nodes) == ("idle", 1, 1)
    assert (b.state, b.idle_nodes, b.total_nodes) == ("busy", 0, 0)
    assert "no usable nodes" in b.reason


@slurm
def test_unknown_partition_is_busy_not_idle(testbed_clusters):
    (s,) = probe([dataclasses.replace(testbed_clusters["alpha"], partition="gpu")], timeout_s=10)
    assert (s.state, s.idle_nodes) == ("busy", 0)


@slurm
def test_refused_login_is_unreachable_others_answer(testbed_clusters):
    dead = _fake(testbed_clusters["beta"], "dead", _dead_port())
    alpha, beta = testbed_clusters["alpha"], testbed_clusters["beta"]
    t0 = time.monotonic()
    statuses = probe([alpha, dead, beta], timeout_s=8)
    assert time.monotonic() - t0 < 8
    assert [s.state for s in statuses] == ["idle", "unreachable", "idle"]
    assert "refused" in statuses[1].reason


@slurm
def test_hanging_logins_cost_one_timeout_not_two(testbed_clusters, silent_port):
    alpha, beta = testbed_clusters["alpha"], testbed_clusters["beta"]
    hang1 = _fake(beta, "hang1", silent_port)
    hang2 = _fake(beta, "hang2", silent_port)
    timeout = 3.0
    t0 = time.monotonic()
    statuses = probe([hang1, alpha, hang2, beta], timeout_s=timeout)
    elapsed = time.monotonic() - t0
    assert [s.state for s in statuses] == ["unreachable", "idle", "unreachable", "idle"]
    assert timeout * 0.9 < elapsed < timeout * 1.7, elapsed  # in parallel: ~one timeout
    for s in (statuses[0], statuses[2]):
        assert s.elapsed_s < timeout * 1.7
        assert "timed out" in s.reason or "timeout" in s.reason.lower()


def test_local_cluster_is_always_available(registry):
    (s,) = probe([registry["local"]])
    assert (s.state, s.idle_nodes, s.total_nodes) == ("local", 1, 1)


def test_probe_never_raises_without_slurm(registry, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no sinfo, no ssh
    # A login that resolves nowhere: not even a broken PATH lets this test reach a real cluster.
    nowhere = dataclasses.replace(registry["research-secure"], name="x", login="login.invalid")
    statuses = probe([nowhere, registry["local"]], timeout_s=2)
    assert [s.state for s in statuses] == ["unreachable", "local"]
    assert "cannot run" in statuses[0].reason


# --- a run without the testbed says so ---------------------------------------------------

AS_NON_ROOT = """
import os, sys, pytest
os.geteuid = lambda: 1000  # the testbed's fixture sees a user who cannot run it
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", sys.argv[1]]))
"""


def test_skipped_slurm_tests_are_the_last_line_and_fail_under_ci():
    """`scripts/test.sh` as non-root skipped every Slurm test in one line among many."""
    test = f"{__file__}::{test_testbed_definitions_compose_with_hydra.__name__}"
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    dev, ci = [
        subprocess.Popen(
            [sys.executable, "-c", AS_NON_ROOT, test],
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for extra in ({}, {"CI": "true"})
    ]
    dev_out, ci_out = dev.communicate(timeout=60)[0], ci.communicate(timeout=60)[0]
    assert dev.returncode == 0, dev_out
    last = dev_out.splitlines()[-1]  # "needs root" and, where so, the missing packages
    assert last.startswith("SKIPPED 1 Slurm testbed tests (Slurm testbed unavailable: needs root")
    assert last.endswith("); CI=true makes this a failure"), last
    assert ci.returncode == 1, ci_out
    assert "[CI is set, so this fails instead of skipping]" in ci_out
    assert "SKIPPED" not in ci_out
