import math

import pytest
import torch

from lingua_sweep.config import OptimConfig
from lingua_sweep.errors import UserError
from lingua_sweep.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    build_optimizer,
    build_scheduler,
    lr_multiplier,
)

STEPS = 100


def curve(scheduler: str, **kw) -> list[float]:
    cfg = OptimConfig(scheduler=scheduler, warmup=10, lr_min_ratio=0.1, **kw)
    return [lr_multiplier(s, cfg, STEPS) for s in range(1, STEPS + 1)]


def test_registries_hold_the_spec_names():
    assert OPTIMIZERS.names() == ["adamw", "sgd"]
    assert SCHEDULERS.names() == ["constant", "cosine", "inv_sqrt", "linear", "wsd"]


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "inv_sqrt", "wsd"])
def test_warmup_is_linear_up_to_the_peak(name):
    lrs = curve(name)
    assert lrs[0] == pytest.approx(0.1)  # step 1 of 10
    assert lrs[4] == pytest.approx(0.5)
    assert lrs[9] == pytest.approx(1.0)  # the peak at the end of warmup


def test_constant_stays_at_the_peak():
    assert curve("constant")[10:] == [1.0] * 90


def test_linear_and_cosine_decay_to_the_minimum_ratio():
    for name in ["linear", "cosine"]:
        lrs = curve(name)
        assert lrs[-1] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    cos = curve("cosine")
    # halfway through the decay, cosine is at the midpoint of peak and floor
    assert cos[9 + 45] == pytest.approx(0.55)


def test_inv_sqrt_halves_at_four_times_warmup():
    lrs = curve("inv_sqrt")
    assert lrs[39] == pytest.approx(0.5)
    assert lrs[-1] == pytest.approx(math.sqrt(10 / 100))


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    lrs = curve("wsd", decay_fraction=0.2)
    assert lrs[10:80] == [1.0] * 70
    assert lrs[89] == pytest.approx(0.55)
    assert lrs[-1] == pytest.approx(0.1)


def test_scheduler_drives_the_optimizer_lr_from_step_one():
    model = torch.nn.Linear(4, 4)
    cfg = OptimConfig(lr=1.0, warmup=10, scheduler="cosine")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, STEPS)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(curve("cosine")[:12])


def test_decay_skips_1d_params():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(optimizer="adamw", weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert [p.ndim for p in decayed["params"]] == [2]
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert isinstance(build_optimizer(model, OptimConfig(optimizer="sgd")), torch.optim.SGD)


def test_unknown_scheduler_fails_when_built():
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimConfig())
    with pytest.raises(UserError, match="unknown scheduler 'cosin'"):
        build_scheduler(opt, OptimConfig(scheduler="cosin"), STEPS)
