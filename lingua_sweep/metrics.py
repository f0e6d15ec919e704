"""Where metrics go: metrics.jsonl always (rank 0), WandB when configured; plus MFU.

WandB naming follows the team's convention so runs line up across clusters:
run name `{experiment}_{cluster}_{job_id}`, group `{experiment}/{cluster}`,
tags `[provider, cluster, gpu_type, experiment, job_{job_id}]`.
"""

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lingua_sweep.config import TrainConfig

# Dense bf16 peak FLOP/s per GPU, matched as substrings of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None


def every_n_steps(step: int, freq: int) -> bool:
    """True every `freq` steps; never for freq <= 0 (the old fork's `x % -1 == 0` bug)."""
    return freq > 0 and step % freq == 0


@dataclass(kw_only=True)
class RunIdentity:
    experiment: str
    cluster: str
    provider: str
    gpu_type: str
    job_id: str

    @property
    def wandb_name(self) -> str:
        return f"{self.experiment}_{self.cluster}_{self.job_id}"

    @property
    def wandb_group(self) -> str:
        return f"{self.experiment}/{self.cluster}"

    @property
    def wandb_tags(self) -> list[str]:
        return [self.provider, self.cluster, self.gpu_type, self.experiment, f"job_{self.job_id}"]


class MetricLogger:
    """Writes one JSON object per line to `metrics.jsonl`; mirrors to WandB on rank 0."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, identity: RunIdentity, *, rank: int):
        self.enabled = rank == 0
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")  # append: a resumed run continues
        if cfg.logging.wandb is not None and cfg.logging.wandb.mode != "disabled":
            self.wandb_run = _init_wandb(cfg, run_dir, identity)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if v is not None}
        record = {"step": step, "time": time.time(), **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=step)

    def close(self, *, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def _init_wandb(cfg: TrainConfig, run_dir: Path, identity: RunIdentity):
    import wandb
    from omegaconf import OmegaConf

    wb = cfg.logging.wandb
    # A stable id from the run directory: a resumed or requeued run continues the same run.
    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(
        project=wb.project,
        entity=wb.entity,
        mode=wb.mode,
        dir=wb.dir or str(run_dir),
        id=run_id,
        resume="allow",
        name=identity.wandb_name,
        group=identity.wandb_group,
        tags=identity.wandb_tags,
        config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
    )


class Throughput:
    """tokens/s and MFU over the interval since the last call (one host sync per interval)."""

    def __init__(self, *, flops_per_token: float, peak_flops_per_s: float | None, world_size: int):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_per_s
        self.world_size = world_size
        self.last_time = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def reset(self) -> None:
        """Start a new interval, e.g. after an evaluation that should not count as training."""
        self.last_time, self.tokens = time.perf_counter(), 0

    def measure(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.last_time, 1e-9)
        tokens_per_s = self.tokens / elapsed  # this rank's tokens
        self.reset()
        out = {
            "tokens_per_s": tokens_per_s * self.world_size,
            "tokens_per_s_per_gpu": tokens_per_s,
        }
        if self.peak:
            out["mfu"] = tokens_per_s * self.flops_per_token / self.peak
        return out


def finite(value: float) -> bool:
    return math.isfinite(value)
