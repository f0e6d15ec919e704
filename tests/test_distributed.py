"""The distributed layer: torchrun's shared run dir, the A100 rule, grad accumulation, compile.

The 2-rank gloo runs (no_shard/full_shard vs 1 rank, sharding, SIGTERM resume) live in
test_train.py; here are the rules around them, on one process.
"""

import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
from hydra.core.override_parser.overrides_parser import OverridesParser
from test_train import (
    TINY,
    child_env,
    corpus_root,
    one_thread,
    read_metrics,
    run_inprocess,
    series,
)

from lingua_sweep import distributed
from lingua_sweep.config import DistributedConfig
from lingua_sweep.errors import UserError

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

# The same tokens in another grouping: only the rounding of the means differs (fp32, CPU).
REGROUP_RTOL = 1e-5


# --- one run directory for every torchrun rank -----------------------------------------------


@pytest.fixture
def agent_store():
    """A real store like the one torchrun's agent serves its workers."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


@pytest.fixture
def torchrun_env(agent_store):
    """The variables torchrun gives its workers, around `agent_store`."""

    def env(rank: int) -> dict:
        return {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(agent_store.port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
        }

    return env


def parse(override: str) -> tuple[str, str]:
    parsed = OverridesParser.create().parse_override(override)
    return parsed.key_or_group, parsed.value()


def run_dir_overrides(argv: list[str]) -> list[tuple[str, str]]:
    return [parse(a) for a in argv if a.startswith("hydra.")]


def test_other_ranks_take_rank_0s_run_dir(torchrun_env, tmp_path):
    argv = ["train.py", "-c", "job", "experiment=debug", "hydra.run.dir=out/${now:%f}"]
    assert distributed.torchrun_argv(argv, torchrun_env(0)) == argv  # rank 0 composes it
    got = {}
    waiter = threading.Thread(
        target=lambda: got.update(rank1=distributed.torchrun_argv(argv, torchrun_env(1)))
    )
    waiter.start()  # blocks until rank 0 publishes
    run_dir = tmp_path / "it's a dir"  # quotes and spaces survive Hydra's override parser
    distributed.publish_run_dir(run_dir, torchrun_env(0))
    waiter.join(timeout=30)
    assert got["rank1"][:3] == ["train.py", "-c", "job"]  # overrides stay after the options
    assert got["rank1"][-1] == "experiment=debug"
    assert run_dir_overrides(got["rank1"]) == [
        ("hydra.run.dir", str(run_dir)),  # in place of the user's own `${now:...}` one
        ("hydra.output_subdir", None),  # .hydra/ is rank 0's
    ]
    # A restarted worker group (torchrun --max-restarts) resumes in the same directory.
    restarted = distributed.torchrun_argv(argv, torchrun_env(0))
    assert run_dir_overrides(restarted) == [("hydra.run.dir", str(run_dir))]


def test_multirun_is_left_alone(torchrun_env):
    argv = ["train.py", "-m", "optim.lr=1,2"]
    assert distributed.torchrun_argv(argv, torchrun_env(1)) == argv


def test_nothing_changes_outside_torchrun(torchrun_env, agent_store):
    """One process, or ranks that another launcher started (srun: no agent store), compose
    their own run dir: nothing is published, nothing is waited for."""
    one_process = {**torchrun_env(0), "WORLD_SIZE": "1"}
    no_agent_store = {**torchrun_env(0), "TORCHELASTIC_USE_AGENT_STORE": "False"}
    argv = ["train.py", "a=1"]
    for environ in ({}, one_process, no_agent_store):
        distributed.publish_run_dir("/x", environ)
        assert distributed.torchrun_argv(argv, environ) == argv
    assert not agent_store.check([distributed.RUN_DIR_KEY])
    # Not even a run dir found in that store is taken, by rank 0 or by the others.
    agent_store.set(distributed.RUN_DIR_KEY, "/elsewhere")
    for environ in (one_process, no_agent_store, {**no_agent_store, "RANK": "1"}):
        assert distributed.torchrun_argv(argv, environ) == argv


# --- a bounded rendezvous ------------------------------------------------------------------


def _dead_port() -> int:
    with socket.socket() as s:  # bound and closed: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, addr: str, port: int) -> dict:
    return {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("no-such-node.invalid", "does not resolve"),  # e.g. a Slurm node name without DNS
        ("127.0.0.1", "could not reach"),  # the master never came up
    ],
)
def test_unreachable_master_fails_within_the_timeout(addr, reason):
    port = _dead_port()
    cfg = DistributedConfig(init_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        distributed.init_distributed(cfg, _rank_env(1, addr, port))
    elapsed = time.monotonic() - t0
    message = str(err.value)
    assert "\n" not in message
    assert f"{addr}:{port}" in message and reason in message
    assert "distributed.init_timeout_s=2" in message
    assert elapsed < 4, elapsed
    assert not dist.is_initialized()


def test_master_alone_fails_within_the_timeout():
    """Rank 0 hosts the store; when no other rank ever joins, it gives up too."""
    port = _dead_port()
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        distributed.init_distributed(
            DistributedConfig(init_timeout_s=2), _rank_env(0, "127.0.0.1", port)
        )
    assert time.monotonic() - t0 < 5
    message = str(err.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message
    assert "distributed.init_timeout_s=2" in message and "1/2 clients joined" in message


RANK_SCRIPT = """
import torch, torch.distributed as dist
from lingua_sweep import distributed
from lingua_sweep.config import DistributedConfig

env = distributed.init_distributed(DistributedConfig(init_timeout_s=60))
total = torch.tensor([env.rank + 1.0])
dist.all_reduce(total)
print("total", total.item())
distributed.shutdown()
"""


def test_ranks_wait_for_a_master_that_comes_up_late():
    """As in a Slurm job: the other ranks start first and wait for rank 0's store."""
    port = _dead_port()
    procs = []

    def start(rank: int) -> None:
        env = child_env(**_rank_env(rank, "127.0.0.1", port))
        out = subprocess.PIPE
        procs.append(
            subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env=env, stdout=out,
                             stderr=subprocess.STDOUT, text=True)
        )  # fmt: skip

    try:
        start(1)
        time.sleep(1)  # rank 1 probes a port nobody listens on yet
        start(0)
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-2000:]
        assert "total 3.0" in out


# --- the A100 rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA A100-SXM4-80GB", (16, 4)),
        ("NVIDIA A100-PCIE-40GB", (16, 4)),
        ("NVIDIA H100 80GB HBM3", (32, 2)),
        ("NVIDIA H200", (32, 2)),
        (None, (32, 2)),  # CPU
    ],
)
def test_a100_rule(name, expected):
    assert distributed.apply_a100_rule(32, 2, name) == expected


def test_a100_rule_needs_an_even_batch():
    with pytest.raises(UserError, match="must be even"):
        distributed.apply_a100_rule(3, 1, "NVIDIA A100-SXM4-80GB")


# --- same global batch, other grouping: same losses ------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return corpus_root(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory) -> list[dict]:
    """Batch 4 x 1 micro-step, no compile."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_inprocess(run_dir, *TINY, f"data.root={data_root}")
    return read_metrics(run_dir)


def assert_same_losses(got: list[dict], ref: list[dict], rel: float) -> None:
    for key in ("loss/init", "loss/out", "loss/val"):
        assert series(got, key) == pytest.approx(series(ref, key), rel=rel), key


def test_grad_accumulation_matches_the_full_batch(data_root, reference, tmp_path):
    # 4 val batches of 2 rows: the tokens of the reference's 2 of 4, so loss/val compares too.
    overrides = ["data.batch_size=2", "optim.grad_acc_steps=2", "logging.val_loss_batches=4"]
    run_inprocess(tmp_path, *TINY, f"data.root={data_root}", *overrides)
    got = read_metrics(tmp_path)
    assert (got[0]["micro_batch_size"], got[0]["grad_acc_steps"]) == (2, 2)
    assert_same_losses(got, reference, REGROUP_RTOL)


def test_a100_halves_the_batch_and_keeps_the_run_the_same(
    data_root, reference, tmp_path, monkeypatch
):
    monkeypatch.setattr(distributed, "gpu_name", lambda device: "NVIDIA A100-SXM4-80GB")
    run_inprocess(tmp_path, *TINY, f"data.root={data_root}")
    got = read_metrics(tmp_path)
    assert (got[0]["micro_batch_size"], got[0]["grad_acc_steps"]) == (2, 2)
    assert_same_losses(got, reference, REGROUP_RTOL)  # loss/val too: same val tokens


def test_a100_rule_can_be_switched_off(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "gpu_name", lambda device: "NVIDIA A100-SXM4-80GB")
    run_inprocess(tmp_path, *TINY, f"data.root={data_root}", "distributed.a100_halve_batch=false")
    first = read_metrics(tmp_path)[0]
    assert (first["micro_batch_size"], first["grad_acc_steps"]) == (4, 1)


@pytest.mark.slow
def test_compile_matches_eager(data_root, reference, tmp_path):
    """Per-block torch.compile (inductor) vs eager: same math, fused kernels' rounding."""
    from torch._dynamo.utils import counters as dynamo_counters  # 1 s to import: only here

    dynamo_counters.clear()
    run_inprocess(tmp_path, *TINY, f"data.root={data_root}", "distributed.compile=true")
    # The blocks really went through dynamo and inductor (AOTAutograd is inductor's front end).
    assert dynamo_counters["frames"]["ok"] >= 1, dict(dynamo_counters)
    assert dynamo_counters["aot_autograd"]["ok"] >= 1, dict(dynamo_counters)
    assert_same_losses(read_metrics(tmp_path), reference, 1e-4)


# bf16 autocast vs fp32 on this tiny model: measured relative differences of 2e-6 to 3e-5 in
# every loss (fp32 reruns are bitwise equal). BF16_RTOL bounds them with room; BF16_MIN_DIFF
# is far above fp32's 0 and far below bf16's largest difference.
BF16_RTOL = 1e-3
BF16_MIN_DIFF = 1e-6


def test_bf16_is_used_and_trains_close_to_fp32(data_root, reference, tmp_path):
    """One process runs bf16 under autocast (fp32 master weights, fp32 loss)."""
    run_inprocess(tmp_path, *TINY, f"data.root={data_root}", "distributed.model_dtype=bf16")
    got = read_metrics(tmp_path)
    assert_same_losses(got, reference, BF16_RTOL)
    diffs = [
        abs(value - series(reference, key)[step]) / abs(value)
        for key in ("loss/init", "loss/out", "loss/val")
        for step, value in series(got, key).items()
    ]
    assert max(diffs) > BF16_MIN_DIFF, "bf16 logged the fp32 losses: model_dtype was ignored"
    # The master weights stay fp32: as many bytes as the fp32 run's.
    assert got[0]["param_bytes_local"] == reference[0]["param_bytes_local"]


def test_all_finite_and_local_bytes_on_one_process():
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = torch.nn.Linear(3, 2, bias=False)  # 6 fp32 weights
    assert distributed.local_param_bytes(model) == 24
    assert distributed.all_finite(model.parameters(), env)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert not distributed.all_finite(model.parameters(), env)
