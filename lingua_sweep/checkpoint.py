"""Checkpoints with torch.distributed.checkpoint (DCP): save, retain, resume, fall back.

Layout under the run directory:
    checkpoints/step_00000100/   DCP shards of model + optimizer, and per-rank train state
    checkpoints/eval/step_.../   consolidated model weights for downstream evaluation
A checkpoint is written under a `.tmp_` name and renamed when every rank has finished, so a
directory named `step_*` is always complete; a latest one that still fails to load (disk
trouble, a half-copied tree) is skipped with a warning in favour of the previous one.
"""

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from lingua_sweep.distributed import DistEnv, barrier

log = logging.getLogger(__name__)

PREFIX = "step_"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob(f"{PREFIX}*") if p.is_dir()), reverse=True)


class Checkpointer:
    def __init__(self, root: Path, env: DistEnv, *, keep: int):
        self.root = root
        self.env = env
        self.keep = keep

    def save(self, *, step: int, model, optimizer, train_state: dict[str, Any]) -> Path:
        """`train_state` is this rank's JSON-able state (scheduler, data loader, step)."""
        final = step_dir(self.root, step)
        tmp = self.root / f".tmp_{final.name}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.env)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        (tmp / f"train_state_rank{self.env.rank}.json").write_text(json.dumps(train_state))
        torch.save(torch.get_rng_state(), tmp / f"rng_rank{self.env.rank}.pt")
        barrier(self.env)
        if self.env.is_main:
            shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step after resume
            tmp.rename(final)
            self._prune()
        barrier(self.env)
        log.info("saved checkpoint %s", final)
        return final

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for old in complete_checkpoints(self.root)[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest(self, *, model, optimizer) -> dict[str, Any] | None:
        """Restores the newest loadable checkpoint; returns this rank's train state or None."""
        for path in complete_checkpoints(self.root):
            try:
                state = self._load(path, model=model, optimizer=optimizer)
            except Exception as e:  # noqa: BLE001 - any failure means "try the previous one"
                log.warning(
                    "checkpoint %s could not be loaded (%s); trying the previous one", path, e
                )
                continue
            log.info("resumed from %s", path)
            return state
        return None

    def _load(self, path: Path, *, model, optimizer) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        train_state = json.loads((path / f"train_state_rank{self.env.rank}.json").read_text())
        torch.set_rng_state(torch.load(path / f"rng_rank{self.env.rank}.pt"))
        return train_state

    def save_eval(self, *, step: int, model) -> Path:
        """Full (unsharded) model weights, for evaluation jobs; never pruned."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        path = self.root / "eval" / f"{PREFIX}{step:08d}.pt"
        if self.env.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(weights, tmp)
            tmp.rename(path)
        barrier(self.env)
        return path
