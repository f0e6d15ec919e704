"""Your own clusters: the user dir and Hydra's --config-dir, for the launcher, CLI and detection."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lingua_sweep.clusters import detect_cluster, load_clusters, user_cluster_dir
from lingua_sweep.errors import UserError

REPO = Path(__file__).resolve().parents[1]
LINGUA_SWEEP = str(Path(sys.executable).parent / "lingua-sweep")
MINE = """\
name: mine
provider: me
login: mine-login      # an ssh alias from your ~/.ssh/config
partition: gpu
gpus_per_node: 4
max_nodes: 2
data_root: /srv/data
output_root: /srv/out
python: $UV_PROJECT_ENVIRONMENT/bin/python
setup: [uv sync --frozen --quiet]
hostname_patterns: [mine-*]
priority: 50
"""


def env_with(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_", "XDG_"))}
    return {**env, "HOME": str(home), **extra}


def test_the_user_dir_adds_clusters_for_loading_and_detection(tmp_path):
    environ = {"HOME": str(tmp_path)}
    d = user_cluster_dir(environ)
    assert d == tmp_path / ".config" / "lingua_sweep" / "clusters"
    d.mkdir(parents=True)
    (d / "mine.yaml").write_text(MINE)
    registry = load_clusters(environ=environ)
    assert registry["mine"].gpus_per_node == 4 and "research-secure" in registry
    assert list(registry)[0] == "mine"  # priority 50 comes before the team's 100
    assert detect_cluster(registry, {"LINGUA_CLUSTER": "mine"}) == "mine"
    assert detect_cluster(registry, {}, hostname="mine-07", slurm_machine=True) == "mine"
    # Only your clusters (and `local`, the last resort):
    only = load_clusters(environ={**environ, "LINGUA_SWEEP_CLUSTERS": "mine"})
    assert list(only) == ["mine", "local"]
    with pytest.raises(UserError, match="LINGUA_SWEEP_CLUSTERS names unknown cluster"):
        load_clusters(environ={**environ, "LINGUA_SWEEP_CLUSTERS": "nope"})


@pytest.mark.parametrize(
    "text, why", [("name: [oops\n", "invalid cluster definition"), ("- a\n- b\n", "a mapping")]
)
def test_a_broken_cluster_file_is_one_line(tmp_path, text, why):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(UserError) as e:
        load_clusters([tmp_path], environ={"HOME": str(tmp_path)})
    assert why in str(e.value) and "\n" not in str(e.value) and "bad.yaml" in str(e.value)


def test_config_dir_clusters_reach_the_cli_and_the_launcher(tmp_path):
    conf = tmp_path / "myconf"
    (conf / "cluster").mkdir(parents=True)
    (conf / "cluster" / "mine.yaml").write_text(MINE.replace("priority: 50", "priority: 5"))
    env = env_with(tmp_path, LINGUA_SWEEP_SSH_DIR=str(tmp_path / "ssh"))
    # The CLI (same flag as Hydra's) lists it; its login node does not resolve: unreachable.
    out = subprocess.run([LINGUA_SWEEP, "clusters", "--json", "--config-dir", str(conf),
                          "--cluster", "mine", "--cluster", "local", "--timeout", "3"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)["clusters"]}
    assert rows["mine"]["gpus_per_node"] == 4 and rows["mine"]["state"] == "unreachable"
    # The launcher reads Hydra's --config-dir too: the dry run plans with `mine` known.
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "--config-dir", str(conf),
           "experiment=debug", "hydra/launcher=multicluster",
           "hydra.launcher.clusters=[mine,local]", "hydra.launcher.dry_run=true",
           "hydra.launcher.probe_timeout_s=3", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    dry = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "mine" in dry.stderr and "unknown cluster" not in dry.stderr
    # And detection: LINGUA_CLUSTER=mine is known through --config-dir.
    info = subprocess.run([sys.executable, str(REPO / "train.py"), "--config-dir", str(conf),
                           "--cfg", "job", "--package", "cluster", "experiment=debug"],
                          cwd=tmp_path, env={**env, "LINGUA_CLUSTER": "mine"},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert info.returncode == 0, info.stderr[-2000:]
    assert "name: mine" in info.stdout


def test_an_exported_slurm_conf_does_not_break_detection_on_a_laptop(tmp_path):
    registry = load_clusters(environ={"HOME": str(tmp_path)})
    assert detect_cluster(registry, {"SLURM_CONF": "/x/slurm.conf"}, hostname="laptop",
                          slurm_machine=None) in ("local",)  # fmt: skip
