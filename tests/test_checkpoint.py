"""Checkpoints: retention, temp-name-then-rename, resume, corrupt-latest fallback, eval weights.

The Checkpointer is exercised directly on a small module (no data, milliseconds), then once
through the trainer for the cadence keys and a fallback resume.
"""

import hashlib
import json
import logging

import pytest
import torch
from test_train import TINY, corpus_root, one_thread, read_metrics, run_inprocess, series
from torch import nn

from lingua_sweep import checkpoint
from lingua_sweep.distributed import DistEnv
from lingua_sweep.errors import UserError

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model, optimizer) -> None:
    model(torch.randn(3, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def saved_steps(root) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in checkpoint.complete_checkpoints(root)]


def test_keep_retains_the_newest_and_no_temp_dirs(tmp_path):
    model, optimizer = make()
    ckpt = checkpoint.Checkpointer(tmp_path, ENV, keep=2)
    (tmp_path / ".tmp_step_00000099").mkdir()  # left by a save that crashed
    for step in range(1, 6):
        ckpt.save(step=step, model=model, optimizer=optimizer, train_state={"step": step})
    assert saved_steps(tmp_path) == [5, 4]
    assert not list(tmp_path.glob(".tmp_*"))


def test_keep_nonpositive_keeps_all(tmp_path):
    model, optimizer = make()
    ckpt = checkpoint.Checkpointer(tmp_path, ENV, keep=0)
    for step in (2, 4, 6):
        ckpt.save(step=step, model=model, optimizer=optimizer, train_state={"step": step})
    assert saved_steps(tmp_path) == [6, 4, 2]


def test_only_complete_step_dirs_count(tmp_path):
    for name in ("step_00000003", ".tmp_step_00000004", "step_12", "eval", "step_00000001"):
        (tmp_path / name).mkdir()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "step_00000003",
        "step_00000001",
    ]


def test_resume_restores_model_optimizer_rng_and_train_state(tmp_path):
    model, optimizer = make()
    for _ in range(3):
        train_step(model, optimizer)
    ckpt = checkpoint.Checkpointer(tmp_path, ENV, keep=2)
    ckpt.save(step=3, model=model, optimizer=optimizer, train_state={"step": 3, "x": [1, 2]})
    expected_rng = torch.randn(5)  # what the RNG yields right after the save
    train_step(model, optimizer)  # the original continues: its next step is the reference
    reference = [p.detach().clone() for p in model.parameters()]

    fresh, fresh_opt = make(seed=1)
    state = checkpoint.Checkpointer(tmp_path, ENV, keep=2).load_latest(
        model=fresh, optimizer=fresh_opt
    )
    assert state == {"step": 3, "x": [1, 2], "world_size": 1}
    assert torch.equal(torch.randn(5), expected_rng)
    train_step(fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), reference, strict=True))


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    model, optimizer = make()
    ckpt = checkpoint.Checkpointer(tmp_path / "none", ENV, keep=2)
    assert ckpt.load_latest(model=model, optimizer=optimizer) is None


@pytest.mark.parametrize("damage", ["truncate_shard", "drop_metadata", "drop_train_state"])
def test_corrupt_latest_falls_back_to_the_previous_with_a_warning(tmp_path, caplog, damage):
    model, optimizer = make()
    ckpt = checkpoint.Checkpointer(tmp_path, ENV, keep=0)
    for step in (1, 2):
        train_step(model, optimizer)
        ckpt.save(step=step, model=model, optimizer=optimizer, train_state={"step": step})
    latest = checkpoint.step_dir(tmp_path, 2)
    if damage == "truncate_shard":
        (shard,) = latest.glob("*.distcp")
        shard.write_bytes(shard.read_bytes()[:20])
    elif damage == "drop_metadata":
        (latest / ".metadata").unlink()
    else:
        (latest / "train_state_rank0.json").unlink()

    fresh, fresh_opt = make(seed=1)
    with caplog.at_level(logging.WARNING):
        state = ckpt.load_latest(model=fresh, optimizer=fresh_opt)
    assert state["step"] == 1
    assert "step_00000002" in caplog.text and "trying the previous one" in caplog.text


def overwrite_in_place(path, byte: int = 0xFF) -> None:
    """Same size, other bytes (a bad disk or a stray write): 0xFF floats are NaN."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    end = min(start + 64, len(data))
    data[start:end] = bytes([byte]) * (end - start)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["__0_0.distcp", "train_state_rank0.json", "rng_rank0.pt"])
def test_bytes_changed_in_place_fail_the_checksum_and_the_previous_one_loads(
    tmp_path, caplog, damaged
):
    model, optimizer = make()
    ckpt = checkpoint.Checkpointer(tmp_path, ENV, keep=0)
    for step in (1, 2):
        train_step(model, optimizer)
        ckpt.save(step=step, model=model, optimizer=optimizer, train_state={"step": step})
    latest = checkpoint.step_dir(tmp_path, 2)
    size = (latest / damaged).stat().st_size
    overwrite_in_place(latest / damaged, byte=ord("7"))
    assert (latest / damaged).stat().st_size == size

    fresh, fresh_opt = make(seed=1)
    with caplog.at_level(logging.WARNING):
        state = ckpt.load_latest(model=fresh, optimizer=fresh_opt)
    assert state["step"] == 1
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{damaged} does not match its checksum" in warning.getMessage()
    assert "\n" not in warning.getMessage() and warning.exc_info is None
    assert ckpt.last_good() == checkpoint.step_dir(tmp_path, 1)


def test_a_load_failure_warns_in_one_line(tmp_path, caplog):
    """A checkpoint whose checksums match but that does not fit the model: DCP's error is a
    page of traceback per rank; the warning keeps its first line."""
    model, optimizer = make()
    ckpt = checkpoint.Checkpointer(tmp_path, ENV, keep=0)
    ckpt.save(step=1, model=model, optimizer=optimizer, train_state={"step": 1})
    other = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 2))
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="no checkpoint"):
        ckpt.load_latest(model=other, optimizer=torch.optim.AdamW(other.parameters()))
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "step_00000001 could not be loaded" in warning.getMessage()
    assert "\n" not in warning.getMessage() and warning.exc_info is None


def test_no_loadable_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
    model, optimizer = make()
    ckpt = checkpoint.Checkpointer(tmp_path, ENV, keep=0)
    ckpt.save(step=1, model=model, optimizer=optimizer, train_state={"step": 1})
    (checkpoint.step_dir(tmp_path, 1) / ".metadata").unlink()
    with pytest.raises(UserError, match="no checkpoint in .* can be loaded"):
        ckpt.load_latest(model=model, optimizer=optimizer)


def test_another_world_size_is_refused(tmp_path):
    model, optimizer = make()
    checkpoint.Checkpointer(tmp_path, ENV, keep=0).save(
        step=1, model=model, optimizer=optimizer, train_state={"step": 1}
    )
    path = checkpoint.step_dir(tmp_path, 1)
    state_file = path / "train_state_rank0.json"
    state_file.write_text(state_file.read_text().replace('"world_size": 1', '"world_size": 8'))
    checksums = json.loads((path / checkpoint.CHECKSUMS).read_text())  # as 8 processes wrote it
    checksums[state_file.name]["sha256"] = hashlib.sha256(state_file.read_bytes()).hexdigest()
    (path / checkpoint.CHECKSUMS).write_text(json.dumps(checksums))
    with pytest.raises(UserError, match="written by 8 processes and this run has 1"):
        checkpoint.Checkpointer(tmp_path, ENV, keep=0).load_latest(model=model, optimizer=optimizer)


def test_eval_weights_are_consolidated_and_load_into_a_plain_model(tmp_path):
    model, optimizer = make()
    train_step(model, optimizer)
    path = checkpoint.Checkpointer(tmp_path, ENV, keep=2).save_eval(step=7, model=model)
    assert path == tmp_path / "eval" / "step_00000007.pt"
    fresh, _ = make(seed=1)
    fresh.load_state_dict(torch.load(path))
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True)
    )
    assert not list(path.parent.glob(".tmp_*"))


# --- through the trainer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return corpus_root(tmp_path_factory)


def test_trainer_cadence_keys(data_root, tmp_path):
    base = [*TINY, f"data.root={data_root}"]
    off = ["logging.val_loss_every=0", "checkpoint.dump.every=-1", "checkpoint.eval.every=0"]
    run_inprocess(tmp_path / "off", *base, *off)
    assert not (tmp_path / "off" / "checkpoints").exists()  # x % -1 == 0 must not fire

    on = ["logging.val_loss_every=2", "checkpoint.dump.every=2", "checkpoint.eval.every=3"]
    run_inprocess(tmp_path / "on", *base, *on, "checkpoint.dump.keep=2")
    root = tmp_path / "on" / "checkpoints"
    assert saved_steps(root) == [6, 4]
    assert sorted(p.name for p in (root / "eval").iterdir()) == [
        "step_00000003.pt",
        "step_00000006.pt",
    ]
    # Checkpoints and evaluations are not computation: the training losses don't move.
    got, ref = read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off")
    assert series(got, "loss/out") == series(ref, "loss/out")
    assert series(got, "loss/val")[6] == series(ref, "loss/val")[6]


@pytest.mark.parametrize("damage", ["junk_metadata", "bytes_in_place"])
def test_trainer_resumes_from_the_previous_checkpoint_when_the_latest_is_corrupt(
    data_root, tmp_path, caplog, damage
):
    """Bytes changed in place used to load silently (NaN weights here), and the NaN loss that
    followed named that checkpoint as the last good one."""
    overrides = [
        *TINY,
        f"data.root={data_root}",
        "checkpoint.dump.every=2",
        "checkpoint.dump.keep=0",
    ]
    run_inprocess(tmp_path, *overrides)
    reference = read_metrics(tmp_path)
    for step in (4, 6):  # both damaged: only step 2 loads
        path = checkpoint.step_dir(tmp_path / "checkpoints", step)
        if damage == "junk_metadata":
            (path / ".metadata").write_bytes(b"junk")
        else:
            overwrite_in_place(path / "__0_0.distcp")
    with caplog.at_level(logging.WARNING):
        run_inprocess(tmp_path, *overrides)
    assert "step_00000006 could not be loaded" in caplog.text
    got = read_metrics(tmp_path)
    for key in ("loss/init", "loss/out", "loss/val"):
        assert series(got, key) == series(reference, key), key
