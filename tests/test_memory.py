"""The memory preflight: its arithmetic against the real model, the one-line error, the cluster
check the sweep launcher calls per job, and one estimate against a measured peak RSS."""

import os
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_train import REPO, child_env, corpus_root, train_cmd

from lingua_sweep import distributed, memory, model
from lingua_sweep.config import ClusterConfig, ModelConfig, TrainConfig, register_configs
from lingua_sweep.errors import UserError

H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"


def preset(name: str, *overrides: str) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", "cluster=local", *overrides])
    return OmegaConf.to_object(cfg)


def cluster(**fields) -> ClusterConfig:
    defaults = dict(name="c", data_root="/data", output_root="/out", gpus_per_node=8)
    return ClusterConfig(**{**defaults, **fields})


# --- the arithmetic ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        dict(dim=832, n_layers=4, n_heads=13),  # the default preset's shape
        dict(dim=256, n_layers=3, n_heads=8, n_kv_heads=2),  # grouped-query attention
        dict(dim=128, n_layers=2, n_heads=4, tie_embeddings=True),
        dict(dim=192, n_layers=1, n_heads=6, ffn_dim_multiplier=1.3, multiple_of=64),
        dict(dim=64, n_layers=2, n_heads=2, norm="layernorm", posembed="none"),
    ],
)
def test_param_count_is_the_real_models(fields):
    cfg = ModelConfig(vocab_size=1000, **fields)
    built = sum(p.numel() for p in model.build_model(cfg).parameters())
    assert memory.param_count(cfg, 1000) == built
    tc = TrainConfig(cluster=cluster(), model=cfg)
    est = memory.estimate(tc, world_size=1)
    assert est.params == est.grads == 4 * built
    assert est.optimizer == 8 * built  # adamw's two fp32 moments


def test_logits_are_three_fp32_copies_and_dominate_the_default_preset():
    est = memory.estimate(preset("default"), gpu=H100)
    assert est.logits == 3 * 4 * 32 * 1024 * 100277
    assert next(iter(est.parts())) == "logits"
    assert 0.8 * 80e9 > est.total > est.logits  # the team runs it on one 80 GB H100


def test_full_shard_divides_weights_grads_and_optimizer_state():
    one = memory.estimate(
        preset("default", "distributed.fsdp_type=no_shard"), gpu=H100, world_size=8
    )
    full = memory.estimate(
        preset("default", "distributed.fsdp_type=full_shard"), gpu=H100, world_size=8
    )
    for part in ("params", "grads", "optimizer"):
        assert getattr(full, part) == getattr(one, part) // 8, part
    assert full.logits == one.logits and full.activations == one.activations
    assert full.total < one.total


def test_an_a100_halves_the_micro_batch_and_so_the_activations():
    tc = preset("default")
    h100, a100 = memory.estimate(tc, gpu=H100), memory.estimate(tc, gpu=A100)
    assert a100.micro_batch == distributed.apply_a100_rule(32, 1, A100)[0] == 16
    assert a100.logits == h100.logits // 2
    assert a100.activations == pytest.approx(h100.activations / 2, rel=1e-6)
    assert a100.params == h100.params
    tc.distributed.a100_halve_batch = False
    assert memory.estimate(tc, gpu=A100).logits == h100.logits
    # An odd batch is left to apply_a100_rule's own error at run time.
    assert memory.micro_batch_size(preset("default", "data.batch_size=7"), A100) == 7


def test_unknown_vocab_is_not_guessed():
    tc = preset(
        "default", "model.vocab_size=null", "data.tokenizer.name=hf", "data.tokenizer.path=/t"
    )
    assert memory.estimate(tc) is None
    assert memory.fit_problem(tc, available_bytes=1, where="here", gpu=None) is None
    assert memory.estimate(preset("default", "model.vocab_size=null")).vocab_size == 100277


# --- the error line ------------------------------------------------------------------------


def test_the_default_preset_on_a_cpu_machine_is_one_line_naming_the_fix():
    with pytest.raises(UserError) as error:
        memory.check_fits(
            preset("default"), available_bytes=24 * 10**9, where="this machine", gpu=None
        )
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "model needs ~47 GB of memory per process "
        "(logits 39 GB at vocab 100277 x batch 32 x seq 1024)"
    )
    assert "this machine has 24 GB available" in message
    assert "lower data.batch_size and raise optim.grad_acc_steps" in message
    assert message.endswith("or use experiment=debug on CPU")


def test_the_fix_follows_the_biggest_term():
    def line(tc, gb, world_size=1):
        return memory.fit_problem(
            tc, available_bytes=gb * 10**9, where="this GPU", gpu=H100, world_size=world_size
        )

    # Weights and optimizer state: a 0.8B-parameter model on a tiny batch.
    big = preset("default", "model.dim=2048", "model.n_layers=8", "model.n_heads=16",
                 "data.batch_size=1", "data.seq_len=64")  # fmt: skip
    assert "(params+grads+adamw 13 GB)" in line(big, 10)
    assert "train a smaller model" in line(big, 10)
    assert "set distributed.fsdp_type=full_shard" in line(big, 10, world_size=8)
    big.distributed.fsdp_type = "full_shard"
    assert line(big, 10, world_size=8) is None
    # Activations (small vocab, compile off): compile is offered too. On a GPU, no debug hint.
    acts = preset("debug", "model.dim=1024", "model.n_heads=16", "data.batch_size=64",
                  "data.seq_len=1024")  # fmt: skip
    assert "(activations " in line(acts, 5) and "distributed.compile=true" in line(acts, 5)
    assert "experiment=debug" not in line(acts, 5)
    assert line(preset("debug"), 20) is None


# --- clusters ------------------------------------------------------------------------------


def test_fits_on_cluster_uses_the_gpu_table_or_the_clusters_own_figure():
    default = preset("default")
    assert memory.cluster_memory_bytes(cluster(gpu_type="H100")) == 80 * 10**9
    assert memory.cluster_memory_bytes(cluster(gpu_type="A100", gpu_memory_gb=80)) == 80 * 10**9
    assert memory.cluster_memory_bytes(cluster(gpu_type="cpu", gpus_per_node=0)) is None
    assert memory.fits_on_cluster(default, cluster(gpu_type="H100")) is None
    assert memory.fits_on_cluster(default, cluster(gpu_type="A100")) is None  # half the batch
    default.distributed.a100_halve_batch = False
    reason = memory.fits_on_cluster(default, cluster(name="miso", gpu_type="A100"))
    assert reason.startswith("model needs ~48 GB of memory per process (logits 39 GB")
    assert "cluster miso (A100, 40 GB per GPU) has 40 GB available" in reason
    assert "experiment=debug" not in reason and "\n" not in reason
    assert memory.fits_on_cluster(default, cluster(gpu_type="A100", gpu_memory_gb=80)) is None
    assert memory.fits_on_cluster(default, cluster(gpu_type="cpu", gpus_per_node=0)) is None
    assert memory.fits_on_cluster(default, cluster(gpu_type="TPUv9")) is None  # unknown


def test_fits_on_cluster_is_cheap_enough_for_a_10000_job_sweep():
    tc, on = preset("default"), cluster(gpu_type="A100")
    start = time.perf_counter()
    for _ in range(10_000):
        memory.fits_on_cluster(tc, on)
    assert time.perf_counter() - start < 2.0


# --- the local device ----------------------------------------------------------------------


def test_cpu_memory_comes_from_meminfo_and_the_tightest_cgroup_limit(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  32000000 kB\nMemAvailable:  20000000 kB\n")
    assert memory._meminfo_available(meminfo) == 20000000 * 1024
    root, own = tmp_path / "cgroup", tmp_path / "self_cgroup"
    own.write_text("0::/user.slice/job\n")
    assert memory._cgroup_room(root, own) is None  # no cgroup files at all
    job, parent = root / "user.slice" / "job", root / "user.slice"
    job.mkdir(parents=True)
    (job / "memory.max").write_text("max\n")
    (job / "memory.current").write_text("1000\n")
    assert memory._cgroup_room(root, own) is None  # no limit
    (parent / "memory.max").write_text(f"{8 * 10**9}\n")
    (parent / "memory.current").write_text(f"{3 * 10**9}\n")
    assert memory._cgroup_room(root, own) == 5 * 10**9  # a parent's limit counts
    (job / "memory.max").write_text(f"{4 * 10**9}\n")
    assert memory._cgroup_room(root, own) == 4 * 10**9 - 1000
    # cgroup v1, as on this VM: no limit is a huge number
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1567674368\n")
    own.write_text("4:memory:/elsewhere\n0::/\n")
    assert memory._cgroup_room(v1, own) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2 * 10**9}\n")
    assert memory._cgroup_room(v1, own) == 2 * 10**9 - 1567674368

    monkeypatch.setattr(memory, "_meminfo_available", lambda: 20 * 10**9)
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 6 * 10**9)
    monkeypatch.setattr(memory, "_own_rss", lambda: 10**9)
    cpu = memory.torch.device("cpu")
    assert memory.local_available_bytes(cpu, {}) == 7 * 10**9
    # torchrun on CPU: the node's processes share it
    assert memory.local_available_bytes(cpu, {"LOCAL_WORLD_SIZE": "2"}) == 4 * 10**9
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    monkeypatch.setattr(memory, "_meminfo_available", lambda: None)
    assert memory.local_available_bytes(cpu, {}) is None  # unknown: no check


# --- measured ------------------------------------------------------------------------------

MEASURED = [
    "experiment=debug", "cluster=local", "data.tokenizer.name=cl100k", "model.dim=64",
    "model.n_layers=2", "data.batch_size=4", "data.seq_len=256", "steps=2", "optim.warmup=1",
    "logging.val_loss_every=0", "logging.val_loss_batches=1",
]  # fmt: skip


def peak_rss(cmd: list[str], env: dict) -> int:
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-3000:]
    return usage.ru_maxrss * 1024


@pytest.mark.slow
def test_estimate_is_within_25_percent_of_the_measured_peak(tmp_path):
    """cl100k's vocab at 1024 tokens: 1.2 GB of logits, the default preset's biggest term."""
    env = child_env(corpus_root())
    run = [*MEASURED, f"hydra.run.dir={tmp_path}"]
    base = peak_rss([sys.executable, "-c", "import torch"], env)
    peak = peak_rss(train_cmd(*run), env)
    est = memory.estimate(preset("debug", *MEASURED[2:]))
    assert (est.total - base) / (peak - base) == pytest.approx(1.0, abs=0.25), (
        est.describe(),
        peak,
    )
