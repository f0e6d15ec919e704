"""Checkpoints with torch.distributed.checkpoint (DCP): save, verify, retain, resume, fall back.

Layout under the run directory:
    checkpoints/step_00000100/   DCP shards of model + optimizer, per-rank train state and RNG,
                                 and checksums.json (sha256 and size of every other file)
    checkpoints/eval/step_00000100.pt   consolidated model weights for downstream evaluation
A checkpoint is written under a `.tmp_` name and renamed when every rank has finished, so a
directory named `step_*` is always complete. Loading first verifies the checksums (the work split
over the ranks), so bytes damaged in place are caught like a truncated file: a latest checkpoint
that fails either way is skipped with a one-line warning in favour of the previous one.

Every decision that could differ between ranks (a file missing on one of them, a failed write)
is agreed with `any_rank` before the next collective, so ranks never diverge into a hang.
"""

import hashlib
import json
import logging
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
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
from lingua_sweep.metrics import describe_error, output_error

log = logging.getLogger(__name__)

PREFIX = "step_"
TMP_PREFIX = ".tmp_"
STEP_DIR = re.compile(rf"{PREFIX}\d{{8}}")
CHECKSUMS = "checksums.json"


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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Checkpointer:
    def __init__(self, root: Path, env: DistEnv, *, keep: int):
        self.root = root
        self.env = env
        self.keep = keep  # <= 0 keeps all

    def _agree(self, error: BaseException | None, path: Path) -> None:
        """Raises on every rank if a write of `path` failed on any (a one-line UserError)."""
        if any_rank(error is not None, self.env):
            if error is None:
                raise UserError(f"cannot write {path}: failed on another rank (see its error)")
            raise output_error(path, error) from error

    def save(self, *, step: int, model, optimizer, train_state: dict[str, Any]) -> Path:
        """`train_state` is this rank's JSON-able state (scheduler, data loader, step)."""
        final = step_dir(self.root, step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        error = None
        if self.env.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                error = e
        self._agree(error, tmp)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        try:
            with _single_process_ok():
                dcp.save(
                    {"model": model_sd, "optim": optim_sd},
                    checkpoint_id=str(tmp),
                    no_dist=self.env.world_size == 1,  # no process group to coordinate with
                )
        except (Exception, CheckpointException) as e:  # DCP raises on every rank
            raise output_error(tmp, e) from e
        try:
            state = {**train_state, "world_size": self.env.world_size}
            _train_state_file(tmp, self.env.rank).write_text(json.dumps(state))
            torch.save(torch.get_rng_state(), _rng_file(tmp, self.env.rank))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            error = e
        self._agree(error, tmp)  # and every rank's files are in tmp
        checksums = self._checksums(tmp)
        if self.env.is_main:
            try:
                (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=1))
                shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step (resume)
                tmp.rename(final)
            except OSError as e:
                error = e
        self._agree(error, final)
        if self.env.is_main:
            self._prune()
            log.info("saved checkpoint %s", final)
        barrier(self.env)
        return final

    def _checksums(self, path: Path) -> dict[str, dict]:
        """{file: {sha256, bytes}} of the checkpoint in `path`, the hashing split over the ranks."""
        names = [None]
        if self.env.is_main:  # one listing: every rank hashes the same split of it
            names[0] = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        if self.env.world_size > 1:
            dist.broadcast_object_list(names, src=0)
        mine = {
            name: {"sha256": _sha256(path / name), "bytes": (path / name).stat().st_size}
            for name in names[0][self.env.rank :: self.env.world_size]
        }
        if self.env.world_size == 1:
            return mine
        parts = [None] * self.env.world_size
        dist.all_gather_object(parts, mine)
        return {name: entry for part in parts for name, entry in sorted(part.items())}

    def _prune(self) -> None:
        # Leftovers of saves interrupted by a crash; no save is in flight here.
        for stale in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.keep <= 0:
            return
        for old in complete_checkpoints(self.root)[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest(self, *, model, optimizer) -> dict[str, Any] | None:
        """Restores the newest checkpoint that verifies and loads; returns this rank's train
        state, or None when there is no checkpoint at all.

        Checkpoints that all fail are an error, as training from scratch would silently
        replace them.
        """
        paths = complete_checkpoints(self.root)
        for path in paths:
            problem = self._problem(path)
            if any_rank(problem is not None, self.env):  # agreed before the collective load
                self._warn(path, problem or "failed on another rank")
                continue
            try:
                state = self._load(path, model=model, optimizer=optimizer)
                error = None
            # Any failure means "try the previous one"; DCP's own is a BaseException.
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                state, error = None, describe_error(e)
            if any_rank(error is not None, self.env):
                self._warn(path, error or "failed on another rank")
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

    def last_good(self) -> Path | None:
        """The newest checkpoint whose files are all there and match their checksums.

        Collective: every rank must call it (it verifies like a load does).
        """
        for path in complete_checkpoints(self.root):
            if not any_rank(self._problem(path) is not None, self.env):
                return path
        return None

    def _warn(self, path: Path, why: str) -> None:
        log.warning("checkpoint %s could not be loaded (%s); trying the previous one", path, why)

    def _problem(self, path: Path) -> str | None:
        """Why `path` must not be loaded, as far as this rank can tell; None if it verifies.

        Cheap checks first (what a partial copy lacks), then this rank's share of the checksums.
        """
        own = (_train_state_file(path, self.env.rank), _rng_file(path, self.env.rank))
        for needed in (path / ".metadata", path / CHECKSUMS, _train_state_file(path, 0), *own):
            if not needed.is_file():
                return f"no {needed.name}"
        try:
            checksums = json.loads((path / CHECKSUMS).read_text())
            expected = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in checksums.items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            return f"unreadable {CHECKSUMS}: {describe_error(e)}"
        try:
            for name, (size, _) in expected.items():
                if (path / name).stat().st_size != size:
                    return f"{name} has {(path / name).stat().st_size} bytes, {size} were written"
            for name in sorted(expected)[self.env.rank :: self.env.world_size]:
                if _sha256(path / name) != expected[name][1]:
                    return f"{name} does not match its checksum: its bytes changed after the save"
        except OSError as e:
            return f"unreadable {Path(e.filename or '?').name}: {e.strerror}"
        try:
            saved_world = json.loads(_train_state_file(path, 0).read_text()).get("world_size")
        except (OSError, ValueError, AttributeError) as e:
            return f"unreadable {_train_state_file(path, 0).name}: {describe_error(e)}"
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
        error = None
        if self.env.is_main:
            tmp = path.with_name(TMP_PREFIX + path.name)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(weights, tmp)
                tmp.rename(path)
                log.info("saved eval weights %s", path)
            except (OSError, RuntimeError) as e:  # torch.save: a full disk is a RuntimeError
                error = e
        self._agree(error, path)
        return path
