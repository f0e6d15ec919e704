"""The trainer's config checks that need no data, no GPU and no run dir.

Run by every single run before training and by the sweep launcher for every job before anything
is submitted, so this module imports only what the checks need (the registries' modules), not
the training loop, checkpointing or data loading.
"""

from lingua_sweep import distributed, model, optim
from lingua_sweep.config import TrainConfig
from lingua_sweep.errors import UserError, did_you_mean
from lingua_sweep.tokenizer import TOKENIZERS

# Vocab sizes known without a tokenizer file, so a launcher can check them before submitting.
KNOWN_VOCAB_SIZES = {"cl100k": 100277, "bytes": 258}


def preflight(cfg: TrainConfig) -> None:
    """Config mistakes that need no data or GPU, raised before any job is submitted."""
    for registry, name, key in [
        (optim.OPTIMIZERS, cfg.optim.optimizer, "optim.optimizer"),
        (optim.SCHEDULERS, cfg.optim.scheduler, "optim.scheduler"),
        (model.NORMS, cfg.model.norm, "model.norm"),
        (model.ACTIVATIONS, cfg.model.activation, "model.activation"),
        (model.POSEMBEDS, cfg.model.posembed, "model.posembed"),
        (TOKENIZERS, cfg.data.tokenizer.name, "data.tokenizer.name"),
    ]:
        if name not in registry:
            raise UserError(f"{key}={name!r} is not registered; choose one of {registry.names()}"
                            + did_you_mean(name, registry.names()))  # fmt: skip
    if cfg.distributed.fsdp_type not in distributed.FSDP_TYPES:
        raise UserError(
            f"distributed.fsdp_type={cfg.distributed.fsdp_type!r}: "
            f"choose one of {distributed.FSDP_TYPES}"
        )
    if cfg.distributed.model_dtype not in distributed.DTYPES:
        raise UserError(
            f"distributed.model_dtype={cfg.distributed.model_dtype!r}: "
            f"choose one of {list(distributed.DTYPES)}"
        )
    model.check_config(cfg.model)
    optim.check_config(cfg.optim)
    if cfg.data.batch_size < 1 or cfg.data.seq_len < 1:
        raise UserError(
            f"data.batch_size={cfg.data.batch_size} and data.seq_len={cfg.data.seq_len} must "
            "both be >= 1"
        )
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise UserError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    known = KNOWN_VOCAB_SIZES.get(cfg.data.tokenizer.name)
    if known and cfg.model.vocab_size not in (None, known):
        raise UserError(
            f"model.vocab_size={cfg.model.vocab_size} does not match tokenizer "
            f"{cfg.data.tokenizer.name!r} ({known}); set model.vocab_size=null to auto-fill"
        )
    if cfg.steps <= 0:
        raise UserError(f"steps={cfg.steps} must be positive")
