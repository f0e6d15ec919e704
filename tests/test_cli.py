import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lingua_sweep.cli import main

SCRIPT = Path(sys.executable).parent / "lingua-sweep"


def _cli(*args, env=None):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.slurm
def test_clusters_json_against_testbed(slurm_testbed):
    # Only the testbed's clusters (and `local`): a test never probes the real clusters.
    only = [a for n in ("local", "beta", "alpha-gpu", "alpha") for a in ("--cluster", n)]
    proc = _cli("clusters", "--json", "--timeout", "5", "--conf-dir", str(slurm_testbed.conf_dir),
                *only, env=slurm_testbed.env_alpha())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rows = {row["name"]: row for row in out["clusters"]}
    names = [row["name"] for row in out["clusters"]]
    assert names == ["alpha", "alpha-gpu", "beta", "local"]  # priority order
    assert (rows["alpha"]["state"], rows["alpha"]["idle_nodes"]) == ("idle", 2)
    assert (rows["beta"]["state"], rows["beta"]["idle_nodes"]) == ("idle", 2)
    assert rows["beta"]["login"] == "beta-hn"
    assert rows["alpha-gpu"]["gpus_per_node"] == 4
    assert out["selected"] == "alpha" and rows["alpha"]["selected"]
    # Two nodes fit alpha (max 2); three fit nowhere reachable.
    proc = _cli("clusters", "--json", "--nodes", "3", "--conf-dir", str(slurm_testbed.conf_dir),
                "--timeout", "5", *only, env=slurm_testbed.env_alpha())  # fmt: skip
    assert json.loads(proc.stdout)["selected"] is None


@pytest.mark.slurm
def test_clusters_one_cluster_over_ssh(slurm_testbed, capsys):
    rc = main(
        ["clusters", "--json", "--cluster", "beta", "--conf-dir", str(slurm_testbed.conf_dir)]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["state"], r["idle_nodes"]) for r in out["clusters"]] == [
        ("beta", "idle", 2)
    ]
    assert out["selected"] == "beta"


def closed_port_cluster(conf_dir, name="nowhere"):
    """A cluster whose login node refuses at once, on loopback (never a real cluster)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / f"{name}.yaml").write_text(
        f"name: {name}\nprovider: test\nlogin: 127.0.0.1\n"
        f"ssh_options: [-F, /dev/null, -p, '{port}']\ngpus_per_node: 8\ngpu_type: A100\n"
        "data_root: /d\noutput_root: /o\npriority: 50\n"
    )
    return conf_dir


@pytest.mark.slurm
def test_clusters_table(slurm_testbed, tmp_path):
    extra = closed_port_cluster(tmp_path / "conf")
    only = [a for n in ("alpha", "beta", "nowhere", "local") for a in ("--cluster", n)]
    proc = _cli("clusters", "--timeout", "5", "--conf-dir", str(slurm_testbed.conf_dir),
                "--conf-dir", str(extra), *only,
                env={**slurm_testbed.env_alpha(), "COLUMNS": "160"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in ["alpha", "beta", "nowhere", "local"]:
        assert name in proc.stdout
    assert "→ alpha" in proc.stdout
    assert "8× A100" in proc.stdout and "unreachable" in proc.stdout


def test_clusters_exit_zero_when_all_unreachable(capsys, tmp_path):
    extra = closed_port_cluster(tmp_path / "conf")
    rc = main(["clusters", "--json", "--timeout", "3", "--conf-dir", str(extra),
               "--cluster", "nowhere", "--cluster", "local"])  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    states = {r["name"]: r["state"] for r in out["clusters"]}
    assert states == {"nowhere": "unreachable", "local": "local"}
    assert out["selected"] == "local"


def test_unknown_cluster_is_one_line_error():
    proc = _cli("clusters", "--cluster", "nope")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown cluster(s) ['nope']")
    assert "research-secure" in lines[0] and "local" in lines[0]


def test_bad_conf_dir_is_one_line_error(tmp_path):
    proc = _cli("clusters", "--conf-dir", str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert os.fspath(tmp_path / "missing") in proc.stderr
