"""The config schema: one kw-only dataclass per component, stored in Hydra's ConfigStore.

This module is the one list of config keys. YAML files under `conf/` only override these
defaults, so a typo (`optim.lrr=1`) or a wrong type (`steps=abc`) fails at compose time with
Hydra's own message, before anything runs.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass(kw_only=True)
class ClusterConfig:
    """One compute cluster: where it is, how to reach it, where its data and outputs live."""

    name: str = MISSING
    provider: str = "local"
    login: str | None = None  # ssh host or alias of the login node; null = this machine
    ssh_options: list[str] = field(default_factory=list)  # extra ssh args, e.g. ["-F", "cfg"]
    env: dict[str, str] = field(default_factory=dict)  # for its Slurm commands, e.g. SLURM_CONF
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 0
    gpu_type: str = "cpu"  # nominal; the trainer detects the real GPU at run time
    gpu_memory_gb: float | None = None  # per GPU; null = lingua_sweep.gpus' figure for gpu_type
    # Training FLOP/s the trainer achieves per GPU (per process on a CPU partition), for placing
    # jobs where they finish first; null = lingua_sweep.gpus' figure for gpu_type.
    model_flops_per_s: float | None = None
    max_nodes: int = 1
    exclude: list[str] = field(default_factory=list)  # known bad nodes, never counted or used
    data_root: str = MISSING
    # Whether data_root can be seen where jobs are submitted (the login node), so a sweep checks
    # the data before submitting; false where it exists only on compute nodes (Together's /data).
    data_on_login_node: bool = True
    output_root: str = MISSING
    # Login node: shell lines that build the environment (e.g. `uv sync --frozen`), run once
    # per code snapshot with UV_PROJECT_ENVIRONMENT set to `env_root/<hash of uv.lock>`;
    # `python` then starts that environment's python (jobs inherit it).
    setup: list[str] = field(default_factory=list)
    python: str = "python"
    job_setup: list[str] = field(default_factory=list)  # lines each job runs first (module load)
    # On a remote login node (relative to the remote home): one immutable dir per code snapshot
    # under remote_code_dir; environments, shared by snapshots with the same uv.lock, under
    # env_root (put both on a big filesystem: login nodes can have small root partitions).
    remote_code_dir: str = "lingua_sweep_code"
    env_root: str = "lingua_sweep_envs"
    hostname_patterns: list[str] = field(default_factory=list)  # fnmatch, for detection
    priority: int = 100  # lower is preferred
    slurm: bool = True  # false: run jobs as local processes (the `local` cluster)
    probe_timeout_s: float = 10.0
    # A simulated Slurm cluster in this process (the fields of sweep.simulator.SimSpec: nodes,
    # gpus_per_node, duration_s, ...), for benchmarks and dry runs; null: a real one.
    simulated: dict[str, Any] | None = None


@dataclass(kw_only=True)
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # null = n_heads (no grouped-query attention)
    vocab_size: int | None = None  # null = taken from the tokenizer
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "silu"
    posembed: str = "rope"
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # only used by learned/none positional schemes and rope tables
    init_std: float = 0.02
    tie_embeddings: bool = False


@dataclass(kw_only=True)
class TokenizerConfig:
    name: str = "cl100k"
    path: str | None = None  # file or dir for hf / tiktoken / sp


@dataclass(kw_only=True)
class DataConfig:
    root: str = "${cluster.data_root}"
    train_files: str = "fineweb_edu_10bt_shuffled/fineweb_edu_10bt.chunk.*.jsonl"
    val_file: str = "fineweb_edu_10bt_shuffled/fineweb_edu_10bt.val.jsonl"
    batch_size: int = 32  # per GPU (per process)
    seq_len: int = 1024
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    add_bos: bool = True
    add_eos: bool = True
    prefetch: int = 8  # batches tokenized ahead in a background thread
    skip_bad_lines: bool = False  # count and skip malformed jsonl lines instead of failing
    seed: int = 0


@dataclass(kw_only=True)
class OptimConfig:
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    grad_clip: float = 1.0  # <= 0 disables
    grad_acc_steps: int = 1
    lr_min_ratio: float = 0.1  # final lr / peak lr for decaying schedules
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    fused: bool | None = None  # null = fused AdamW on GPU, foreach elsewhere


@dataclass(kw_only=True)
class DistributedConfig:
    fsdp_type: str = "no_shard"  # no_shard (DDP semantics) | full_shard (FSDP2)
    compile: bool = True
    model_dtype: str = "bf16"  # bf16 | fp32 (compute dtype; master weights stay fp32)
    backend: str | None = None  # null = nccl on GPU, gloo on CPU
    a100_halve_batch: bool = True  # the spec's A100 rule: half batch, double grad_acc
    # Stop before training (and a sweep before submitting) when the estimated peak memory
    # (lingua_sweep.memory) does not fit the device; false: trust the config and try.
    memory_check: bool = True
    # Process-group rendezvous limit: an unreachable master fails in this time, not at the
    # allocation's time limit.
    init_timeout_s: float = 180.0


@dataclass(kw_only=True)
class WandbConfig:
    project: str = "lingua_sweep"
    entity: str | None = None
    mode: str | None = None  # online | offline | disabled; null = wandb's default / WANDB_MODE
    dir: str | None = None  # null = the run directory


@dataclass(kw_only=True)
class LoggingConfig:
    freq: int = 10
    val_loss_every: int = 100  # 0 disables
    val_loss_batches: int = 10
    # null (or mode: disabled) disables WandB; a mapping by default so that a single override
    # such as `logging.wandb.mode=offline` can switch it on (OmegaConf can't set keys of null).
    wandb: WandbConfig | None = field(default_factory=WandbConfig)


@dataclass(kw_only=True)
class DumpConfig:
    every: int = -1  # <= 0 never fires
    keep: int = 2  # <= 0 keeps all


@dataclass(kw_only=True)
class EvalConfig:
    every: int = -1  # <= 0 never fires


@dataclass(kw_only=True)
class CheckpointConfig:
    dump: DumpConfig = field(default_factory=DumpConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass(kw_only=True)
class TrainConfig:
    name: str = "debug"  # the experiment name: WandB group/run names and output paths
    dump_base: str = "${cluster.output_root}"
    steps: int = 1000
    seed: int = 42
    # The code a sweep's job runs: git commit (+"-dirty"), set by the sweep launcher; in the
    # run's config.yaml and WandB config.
    code_version: str | None = None
    cluster: ClusterConfig = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig, package="cluster")


def to_object(cfg: Any) -> TrainConfig:
    """The typed dataclass view of a composed DictConfig (interpolations resolved)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def unknown_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Keys of a composed config that its dataclass schema does not have.

    Hydra's `+key=value` adds keys even to a typed config; with a schema that lists every key,
    an added key is always a typo that would otherwise be silently ignored.
    """
    from dataclasses import fields, is_dataclass

    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(cfg)
    if not is_dataclass(schema):
        return []
    allowed = {f.name for f in fields(schema)}
    found = []
    for key in cfg:
        if key == "hydra" and not prefix:
            continue
        if key not in allowed:
            found.append(f"{prefix}{key}")
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            found += unknown_keys(node, f"{prefix}{key}.")
    return found


def check_known_keys(cfg: Any) -> None:
    from lingua_sweep.errors import UserError, did_you_mean

    unknown = unknown_keys(cfg)
    if unknown:
        raise UserError(
            f"unknown config key(s) {', '.join(unknown)}; `python train.py --cfg job` lists "
            "every key (a `+` does not make a new key valid)"
            + did_you_mean(unknown[0], [k for k in config_keys(cfg) if k not in unknown])
        )


def config_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (Hydra's own settings left out)."""
    from omegaconf import DictConfig

    out = []
    for key in cfg:
        if key == "hydra" and not prefix:
            continue
        out.append(f"{prefix}{key}")
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            out += config_keys(node, f"{prefix}{key}.")
    return out
