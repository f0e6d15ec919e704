"""The testbed's jobs are shaped like the real clusters' jobs: several nodes, one task per GPU.

Node names resolve (torch's rendezvous dials the job's first node by name), a partition has
two nodes, another advertises GPUs. The /etc/hosts editing is checked on a scratch file too.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_testbed as testbed_lib

slurm = pytest.mark.slurm


def _run(argv: list[str], testbed, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        argv, env=testbed.env_alpha(), capture_output=True, text=True, timeout=timeout, **kw
    )
    assert proc.returncode == 0, f"{argv}: {proc.stderr[-2000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@slurm
def test_node_names_resolve_to_loopback(slurm_testbed):
    assert len(slurm_testbed.node_names) == 6
    for name in slurm_testbed.node_names:
        assert socket.gethostbyname(name) == "127.0.0.1", name


@slurm
def test_two_node_job_runs_on_two_nodes(slurm_testbed, tmp_path):
    out = _run(
        ["srun", f"--partition={slurm_testbed.cpu_partition}", "--nodes=2",
         "--ntasks-per-node=8", "--", "bash", "-c", "echo $SLURMD_NODENAME $SLURM_NTASKS"],
        slurm_testbed, cwd=tmp_path,
    ).stdout.split("\n")  # fmt: skip
    lines = sorted(line for line in out if line)
    assert lines == ["alpha1 16"] * 8 + ["alpha2 16"] * 8


RANK_SCRIPT = """
import submitit
import torch
import torch.distributed as dist

from lingua_sweep import distributed
from lingua_sweep.config import DistributedConfig

# What the launcher's jobs do: torch's variables from Slurm's, the master being the first node.
env_vars = submitit.helpers.TorchDistributedEnvironment().export(
    set_cuda_visible_devices=False, overwrite=True
)
env = distributed.init_distributed(DistributedConfig(init_timeout_s=60))
total = torch.tensor([env.rank + 1.0])
dist.all_reduce(total)
print(f"rank {env.rank}/{env.world_size} master {env_vars.master_addr} total {total.item()}")
distributed.shutdown()
"""


@slurm
def test_two_node_torch_job_meets_at_the_first_node(slurm_testbed, tmp_path):
    """One rank per node; the master address is the first node's name, as in submitit's jobs."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {
        **slurm_testbed.env_alpha(),
        "SUBMITIT_EXECUTOR": "slurm",  # what submitit's own batch scripts export
        "MASTER_PORT": str(_free_port()),  # submitit's default derives it from the job id
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["srun", f"--partition={slurm_testbed.cpu_partition}", "--nodes=2",
         "--ntasks-per-node=1", "--time=3", sys.executable, str(script)],
        env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert ranks == ["rank 0/2 master alpha1 total 3.0", "rank 1/2 master alpha1 total 3.0"]


def _gres(testbed) -> dict[str, tuple[str, str]]:
    out = _run(
        ["sinfo", "--noheader", "--Node", f"--partition={testbed.gpu_partition}",
         "--Format=NodeList:|,Gres:|,GresUsed:|"],
        testbed,
    ).stdout  # fmt: skip
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return {r[0].strip(): (r[1].strip(), r[2].strip()) for r in rows}


@slurm
def test_gpu_partition_advertises_and_counts_gpus(slurm_testbed, tmp_path):
    gpus = f"gpu:{slurm_testbed.gpus_per_node}"
    assert _gres(slurm_testbed) == {node: (gpus, "gpu:0") for node in slurm_testbed.gpu_nodes}
    job = _run(
        ["sbatch", "--parsable", f"--partition={slurm_testbed.gpu_partition}", "--nodes=1",
         "--gpus-per-node=1", "--output=/dev/null", f"--chdir={tmp_path}", "--wrap", "sleep 60"],
        slurm_testbed,
    ).stdout.strip().split(";")[0]  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        used = []
        while time.monotonic() < deadline:
            used = sorted(u for _, u in _gres(slurm_testbed).values())
            if used == ["gpu:0", "gpu:1"]:
                break
            time.sleep(0.3)
        assert used == ["gpu:0", "gpu:1"]
    finally:
        _run(["scancel", job], slurm_testbed)


@slurm
def test_one_task_per_gpu_job_sees_its_gpus(slurm_testbed, tmp_path):
    out = _run(
        ["srun", f"--partition={slurm_testbed.gpu_partition}", "--nodes=2",
         "--gpus-per-node=2", "--ntasks-per-node=2", "--", "bash", "-c",
         "echo $SLURMD_NODENAME $SLURM_GPUS_ON_NODE $SLURM_PROCID"],
        slurm_testbed, cwd=tmp_path,
    ).stdout  # fmt: skip
    rows = sorted(line.split() for line in out.splitlines() if line.strip())
    nodes = slurm_testbed.gpu_nodes
    assert [(r[0], r[1]) for r in rows] == [(nodes[0], "2")] * 2 + [(nodes[1], "2")] * 2
    assert sorted(r[2] for r in rows) == ["0", "1", "2", "3"]


@slurm
def test_gpu_cluster_definition(slurm_testbed):
    from lingua_sweep.clusters import load_clusters

    gpu = load_clusters([slurm_testbed.conf_dir])[slurm_testbed.gpu_cluster]
    assert (gpu.partition, gpu.gpus_per_node, gpu.max_nodes, gpu.login) == (
        slurm_testbed.gpu_partition, slurm_testbed.gpus_per_node, 2, None
    )  # fmt: skip
    assert gpu.env == {"SLURM_CONF": str(slurm_testbed.alpha_slurm_conf)}


# --- the /etc/hosts block, on a scratch file -------------------------------------------------

OTHERS = "127.0.0.1 localhost\n# a comment\n::1 ip6-localhost\t ip6-loopback\n"


def test_hosts_block_is_added_once_and_removed_exactly(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(OTHERS)
    hosts.chmod(0o644)
    state, other = Path("/tmp/tb1"), Path("/tmp/tb2")
    testbed_lib.add_hosts_entries(state, hosts)
    once = hosts.read_text()
    testbed_lib.add_hosts_entries(state, hosts)
    assert hosts.read_text() == once
    assert once.startswith(OTHERS) and once.count("alpha1") == 1
    testbed_lib.add_hosts_entries(other, hosts)  # a second testbed's block
    testbed_lib.remove_hosts_entries(state, hosts)
    assert hosts.read_text() == OTHERS + once[len(OTHERS) :].replace("/tmp/tb1", "/tmp/tb2")
    testbed_lib.remove_hosts_entries(other, hosts)
    testbed_lib.remove_hosts_entries(other, hosts)
    assert hosts.read_text() == OTHERS
    assert hosts.stat().st_mode & 0o777 == 0o644


def test_hosts_file_that_cannot_be_renamed_over_is_rewritten_in_place(tmp_path, monkeypatch):
    """As a bind-mounted /etc/hosts in a container: rename fails with EBUSY."""
    hosts = tmp_path / "hosts"
    hosts.write_text(OTHERS.rstrip("\n"))  # no final newline
    inode = hosts.stat().st_ino

    def busy(src, dst):
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(os, "replace", busy)
    testbed_lib.add_hosts_entries(Path("/tmp/tb1"), hosts)
    assert hosts.read_text().startswith(OTHERS) and "alpha1" in hosts.read_text()
    testbed_lib.remove_hosts_entries(Path("/tmp/tb1"), hosts)
    assert hosts.read_text() == OTHERS  # the other lines, a final newline added
    assert hosts.stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == ["hosts"]


def test_hosts_block_without_its_end_marker_is_left_alone(tmp_path):
    hosts = tmp_path / "hosts"
    torn = OTHERS + "# lingua_sweep testbed begin /tmp/tb1\n127.0.0.1 alpha1\n"
    hosts.write_text(torn)
    testbed_lib.remove_hosts_entries(Path("/tmp/tb1"), hosts)
    assert hosts.read_text() == torn
