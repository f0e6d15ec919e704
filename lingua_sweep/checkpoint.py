"""Checkpoints with torch.distributed.checkpoint (DCP): save, retain, resume, fall back.

Layout under the run directory:
    checkpoints/step_00000100/   DCP shards of model + optimizer, and per-rank train state
    checkpoints/eval/step_00000100.pt   consolidated model weights for downstream evaluation
A checkpoint is written under a `.tmp_` name and renamed when every rank has finished, so a
directory named `step_*` is always complete; a latest one that still fails to load (disk
trouble, a half-copied tree) is skipped with a warning in favour of the previous one.

Every decision that could differ between ranks (a file missing on one of them) is agreed with
`any_rank` before the next collective, so ranks never diverge into a hang.
"""

import json
import logging
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from lingua_sweep.distributed import DistEnv, any_rank, barrier
from lingua_sweep.errors import UserError

log = logging.getLogger(__name__)

PREFIX = "step_"
TMP_PREFIX = ".tmp_"
STEP_DIR = re.compile(rf"{PREFIX}\d{{8}}")


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, newest first (temporary `.tmp_*` ones never match)."""
    if not root.is_dir():
        return []
    found = (p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name))
    return sorted(found, reverse=True)


def _train_state_file(path: Path, rank: int) -> Path:
    return path / f"train_state_rank{rank}.json"


def _rng_file(path: Path, rank: int) -> Path:
    return path / f"rng_rank{rank}.pt"


@contextmanager
def _single_process_ok():
    # DCP warns on every call without a process group, even when told `no_dist=True`.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Checkpointer:
    def __init__(self, root: Path, env: DistEnv, *, keep: int):
        self.root = root
        self.env = env
        self.keep = keep  # <= 0 keeps all

    def save(self, *, step: int, model, optimizer, train_state: dict[str, Any]) -> Path:
        """`train_state` is this rank's JSON-able state (scheduler, data loader, step)."""
        final = step_dir(self.root, step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.env)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _single_process_ok():
            dcp.save(
                {"model": model_sd, "optim": optim_sd},
                checkpoint_id=str(tmp),
                no_dist=self.env.world_size == 1,  # no process group to coordinate with
            )
        state = {**train_state, "world_size": self.env.world_size}
        _train_state_file(tmp, self.env.rank).write_text(json.dumps(state))
        torch.save(torch.get_rng_state(), _rng_file(tmp, self.env.rank))
        barrier(self.env)  # every rank's files are in tmp: now it may become a checkpoint
        if self.env.is_main:
            shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step after resume
            tmp.rename(final)
            self._prune()
            log.info("saved checkpoint %s", final)
        barrier(self.env)
        return final

    def _prune(self) -> None:
        # Leftovers of saves interrupted by a crash; no save is in flight here.
        for stale in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.keep <= 0:
            return
        for old in complete_checkpoints(self.root)[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest(self, *, model, optimizer) -> dict[str, Any] | None:
        """Restores the newest loadable checkpoint; returns this rank's train state or None.

        None only when there is no checkpoint at all: checkpoints that all fail to load are an
        error, as training from scratch would silently replace them.
        """
        paths = complete_checkpoints(self.root)
        for path in paths:
            problem = self._missing_files(path)
            if any_rank(problem is not None, self.env):  # agreed before the collective load
                problem = problem or "on another rank"
                log.warning(
                    "checkpoint %s is incomplete (%s); trying the previous one", path, problem
                )
                continue
            try:
                state = self._load(path, model=model, optimizer=optimizer)
                error = None
            # Any failure means "try the previous one"; DCP's own is a BaseException.
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                state, error = None, e
            if any_rank(error is not None, self.env):
                log.warning(
                    "checkpoint %s could not be loaded (%s); trying the previous one",
                    path,
                    error or "failed on another rank",
                )
                continue
            if self.env.is_main:
                log.info("resumed from %s", path)
            return state
        if paths:
            raise UserError(
                f"no checkpoint in {self.root} can be loaded (see the warnings above); "
                "move the directory away to start afresh, or use another hydra.run.dir"
            )
        return None

    def _missing_files(self, path: Path) -> str | None:
        """Cheap checks before DCP touches the model: what a partial copy would lack."""
        own = (_train_state_file(path, self.env.rank), _rng_file(path, self.env.rank))
        for needed in (path / ".metadata", _train_state_file(path, 0), *own):
            if not needed.is_file():
                return f"no {needed.name}"
        try:
            saved_world = json.loads(_train_state_file(path, 0).read_text()).get("world_size")
        except ValueError as e:
            return f"unreadable {_train_state_file(path, 0).name}: {e}"
        if saved_world not in (None, self.env.world_size):
            # Not a corrupt checkpoint: every older one has the same problem. Every rank reads
            # rank 0's file, so all of them raise.
            raise UserError(
                f"{path} was written by {saved_world} processes and this run has "
                f"{self.env.world_size}; resume with the same number of processes"
            )
        return None

    def _load(self, path: Path, *, model, optimizer) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(path), no_dist=self.env.world_size == 1)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        train_state = json.loads(_train_state_file(path, self.env.rank).read_text())
        torch.set_rng_state(torch.load(_rng_file(path, self.env.rank)))
        return train_state

    def save_eval(self, *, step: int, model) -> Path:
        """Full (unsharded) model weights, for evaluation jobs; never pruned.

        `Transformer(cfg).load_state_dict(torch.load(path))` restores them on one device.
        """
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)  # collective; full on rank 0
        path = self.root / "eval" / f"{PREFIX}{step:08d}.pt"
        if self.env.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(TMP_PREFIX + path.name)
            torch.save(weights, tmp)
            tmp.rename(path)
            log.info("saved eval weights %s", path)
        barrier(self.env)
        return path
