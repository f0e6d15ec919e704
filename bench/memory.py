"""lingua_sweep.memory's estimate vs the measured peak memory of the real trainer, on CPU.

    .venv/bin/python bench/memory.py                    # every config below
    .venv/bin/python bench/memory.py --only cl100k-bf16 --only d256-fp32
    .venv/bin/python bench/memory.py --threads 2

Each config is `python train.py experiment=debug cluster=local <its overrides>` for a few steps
(the peak comes at step 2, once the optimizer has its state), in a fresh process: the trainer's
own loop, data loader and evaluation, nothing re-implemented. Its peak RSS (ru_maxrss from
os.wait4) is compared with `memory.estimate(...).total`; both also less the peak RSS of a process
that only imported torch (the baseline), which is the stricter comparison: the estimate's CPU
overhead term is then judged only on what the trainer adds to a bare torch process.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lingua_sweep import corpus, memory  # noqa: E402

# Few steps, no validation, one val batch for loss/init: the peak is the training step's.
COMMON = [
    "experiment=debug", "cluster=local", "steps=3", "optim.warmup=1", "logging.freq=1",
    "logging.val_loss_every=0", "logging.val_loss_batches=1",
]  # fmt: skip
CL100K = ["data.tokenizer.name=cl100k"]
CONFIGS: dict[str, list[str]] = {
    # activations dominate (bytes tokenizer: vocab 258)
    "d256-L4-fp32": ["model.dim=256", "model.n_layers=4", "data.batch_size=32"],
    "d256-L4-bf16": ["model.dim=256", "model.n_layers=4", "data.batch_size=32",
                     "distributed.model_dtype=bf16"],
    "d512-L2-bf16-gqa": ["model.dim=512", "model.n_layers=2", "model.n_heads=8",
                         "model.n_kv_heads=2", "data.batch_size=16", "data.seq_len=512",
                         "distributed.model_dtype=bf16"],
    "d256-L2-bf16-compile": ["model.dim=256", "model.n_layers=2", "data.batch_size=32",
                             "distributed.model_dtype=bf16", "distributed.compile=true"],
    "d256-L2-fp32-b128": ["model.dim=256", "model.n_layers=2", "data.batch_size=128"],
    "d256-L2-fp32-compile": ["model.dim=256", "model.n_layers=2", "data.batch_size=32",
                             "distributed.compile=true"],
    # logits dominate (cl100k: vocab 100277)
    "cl100k-fp32": [*CL100K, "model.dim=64", "model.n_layers=2", "data.batch_size=4"],
    "cl100k-bf16": [*CL100K, "model.dim=64", "model.n_layers=2", "data.batch_size=4",
                    "distributed.model_dtype=bf16"],
    "cl100k-bf16-seq512": [*CL100K, "model.dim=128", "model.n_layers=2", "data.batch_size=2",
                           "data.seq_len=512", "distributed.model_dtype=bf16"],
    # the default preset's model (201M parameters), on a CPU-sized micro-batch
    "default-model-b1": [*CL100K, "model.dim=832", "model.n_layers=4", "model.n_heads=13",
                         "data.batch_size=1", "data.seq_len=256",
                         "distributed.model_dtype=bf16"],
    # weights and optimizer dominate: the peak is the optimizer step
    "cl100k-d512-adamw": [*CL100K, "model.dim=512", "model.n_layers=1", "model.n_heads=8",
                          "data.batch_size=1", "data.seq_len=64"],
    "cl100k-d512-sgd-acc2": [*CL100K, "model.dim=512", "model.n_layers=1", "model.n_heads=8",
                             "data.batch_size=1", "data.seq_len=64", "optim.optimizer=sgd",
                             "optim.grad_acc_steps=2"],
    "cl100k-d256-tied-acc2": [*CL100K, "model.dim=256", "model.n_layers=2",
                              "model.tie_embeddings=true", "data.batch_size=2",
                              "optim.grad_acc_steps=2"],
}  # fmt: skip
# Two processes (torchrun, gloo): FSDP2's sharding, its buffers, its bf16 weights. ru_maxrss of
# torchrun is that of its biggest worker.
TWO_RANKS: dict[str, list[str]] = {
    "2r-cl100k-d512-full_shard": [*CL100K, "model.dim=512", "model.n_layers=1",
                                  "model.n_heads=8", "data.batch_size=1", "data.seq_len=64",
                                  "distributed.fsdp_type=full_shard"],
    "2r-cl100k-d512-no_shard-bf16": [*CL100K, "model.dim=512", "model.n_layers=1",
                                     "model.n_heads=8", "data.batch_size=1", "data.seq_len=64",
                                     "distributed.model_dtype=bf16"],
    "2r-d256-L4-bf16": ["model.dim=256", "model.n_layers=4", "data.batch_size=32",
                        "distributed.model_dtype=bf16"],
    "2r-cl100k-bf16-full_shard": [*CL100K, "model.dim=64", "model.n_layers=2",
                                  "data.batch_size=4", "distributed.model_dtype=bf16",
                                  "distributed.fsdp_type=full_shard"],
}  # fmt: skip


def child_env(threads: int) -> dict:
    drop = ("SLURM_", "TORCHELASTIC_", "WANDB_")
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in names}
    env.update(OMP_NUM_THREADS=str(threads), HYDRA_FULL_ERROR="0", PYTHONPATH=str(REPO))
    return env


def peak_rss(cmd: list[str], env: dict) -> tuple[int, str]:
    """Peak RSS in bytes of `cmd` (and of the children it waited for), and its stderr's tail."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {tail}")
    return usage.ru_maxrss * 1024, tail  # Linux reports KiB


def baseline_rss(env: dict) -> int:
    return peak_rss([sys.executable, "-c", "import torch"], env)[0]


def train_overrides(overrides: list[str], data_root: Path, run_dir: Path) -> list[str]:
    return [*COMMON, *overrides, f"data.root={data_root}", f"hydra.run.dir={run_dir}"]


def estimate_of(overrides: list[str], world_size: int = 1) -> memory.MemoryEstimate:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lingua_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    tc = OmegaConf.to_object(cfg)
    est = memory.estimate(tc, gpu=None, world_size=world_size)
    assert est is not None, "every config here has a known vocab size"
    return est


def measure(
    name: str, overrides: list[str], *, data_root: Path, env: dict, base: int, ranks: int = 1
) -> dict:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    with tempfile.TemporaryDirectory() as tmp:
        full = train_overrides(overrides, data_root, Path(tmp) / "run")
        peak, _ = peak_rss([*launcher, "train.py", *full], env)
        est = estimate_of(full, world_size=ranks)
    return {
        "name": name,
        "estimate": est.total,
        "peak": peak,
        "ratio": (est.total - base) / (peak - base),
        "ratio_total": est.total / peak,
        "describe": est.describe(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(CONFIGS | TWO_RANKS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    env = child_env(args.threads)
    data_root = corpus.ensure_built()
    base = baseline_rss(env)
    print(f"baseline (python -c 'import torch'): {base / 1e6:.0f} MB")
    header = "| config | estimate MB | peak RSS MB | est-base / peak-base | est / peak | estimate |"
    print(header)
    print("|---|---|---|---|---|---|")
    worst = 1.0
    for name in args.only or [*CONFIGS, *TWO_RANKS]:
        ranks = 2 if name in TWO_RANKS else 1
        overrides = TWO_RANKS[name] if ranks > 1 else CONFIGS[name]
        row = measure(name, overrides, data_root=data_root, env=env, base=base, ranks=ranks)
        worst = max(worst, row["ratio"], 1 / row["ratio"])
        print(
            f"| {name} | {row['estimate'] / 1e6:,.0f} | {row['peak'] / 1e6:,.0f} | "
            f"{row['ratio']:.2f} | {row['ratio_total']:.2f} | {row['describe']} |",
            flush=True,
        )
    print(f"worst ratio (either way): {worst:.2f} (target <= 1.25)")


if __name__ == "__main__":
    main()
