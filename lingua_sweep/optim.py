"""Optimizer and learning-rate scheduler registries.

A scheduler is a function `(step, cfg, total_steps) -> multiplier of the peak lr`, with linear
warmup applied once around every schedule; `build_scheduler` wraps it in a LambdaLR so its
state checkpoints with the optimizer's.
"""

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from lingua_sweep.config import OptimConfig
from lingua_sweep.errors import UserError
from lingua_sweep.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULERS: Registry[Callable[[int, OptimConfig, int], float]] = Registry("scheduler")

register_optimizer = OPTIMIZERS.register
register_scheduler = SCHEDULERS.register


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Norm weights and embeddings are not decayed (1-D params and the embedding table).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "tok_embeddings" in name else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@register_optimizer("adamw")
def adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    on_gpu = next(model.parameters()).is_cuda
    fused = on_gpu if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


@register_optimizer("sgd")
def sgd(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)


def _decay_progress(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """0 at the end of warmup, 1 at the last step."""
    span = max(total_steps - cfg.warmup, 1)
    return min(max(step - cfg.warmup, 0) / span, 1.0)


@register_scheduler("constant")
def constant(step: int, cfg: OptimConfig, total_steps: int) -> float:
    return 1.0


@register_scheduler("linear")
def linear(step: int, cfg: OptimConfig, total_steps: int) -> float:
    progress = _decay_progress(step, cfg, total_steps)
    return 1.0 - (1.0 - cfg.lr_min_ratio) * progress


@register_scheduler("cosine")
def cosine(step: int, cfg: OptimConfig, total_steps: int) -> float:
    progress = _decay_progress(step, cfg, total_steps)
    return cfg.lr_min_ratio + (1.0 - cfg.lr_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@register_scheduler("inv_sqrt")
def inv_sqrt(step: int, cfg: OptimConfig, total_steps: int) -> float:
    # Continues smoothly from the warmup peak: 1 at step == warmup, then 1/sqrt(step/warmup).
    return math.sqrt(max(cfg.warmup, 1) / max(step, cfg.warmup, 1))


@register_scheduler("wsd")
def wsd(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Warmup-stable-decay: flat at the peak, then a linear decay over the last steps."""
    decay_steps = max(int(cfg.decay_fraction * total_steps), 1)
    decay_start = total_steps - decay_steps
    if step <= decay_start:
        return 1.0
    progress = min((step - decay_start) / decay_steps, 1.0)
    return 1.0 - (1.0 - cfg.lr_min_ratio) * progress


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at `step` (1-based: step 1 is the first update)."""
    schedule = SCHEDULERS.get(cfg.scheduler)(step, cfg, total_steps)
    if cfg.warmup > 0 and step < cfg.warmup:
        return schedule * step / cfg.warmup
    return schedule


def check_config(cfg: OptimConfig) -> None:
    """Values torch would reject with a traceback at build time (or that would silently train
    nonsense), as one-line UserErrors. Registry names are checked by the trainer's preflight."""
    checks = [
        ("lr", cfg.lr >= 0, ">= 0"),
        ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("eps", cfg.eps >= 0, ">= 0"),
        ("momentum", cfg.momentum >= 0, ">= 0"),
        ("beta1", 0 <= cfg.beta1 < 1, "in [0, 1)"),
        ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"),
        ("lr_min_ratio", cfg.lr_min_ratio >= 0, ">= 0"),
        ("decay_fraction", 0 <= cfg.decay_fraction <= 1, "in [0, 1]"),
        ("warmup", cfg.warmup >= 0, ">= 0"),
        ("grad_acc_steps", cfg.grad_acc_steps >= 1, ">= 1"),
    ]
    for key, ok, allowed in checks:
        value = getattr(cfg, key)
        if not ok or not math.isfinite(value):  # NaN fails every comparison above
            raise UserError(f"optim.{key}={value} must be {allowed}")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.optimizer)(model, cfg)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> LambdaLR:
    SCHEDULERS.get(cfg.scheduler)  # fail on an unknown name now, not at the first step
    # LambdaLR calls the lambda with its own epoch counter, 0 before the first step; the
    # update of step s uses the lr set after s-1 scheduler steps, so shift by one.
    return LambdaLR(optimizer, lambda epoch: lr_multiplier(epoch + 1, cfg, total_steps))
