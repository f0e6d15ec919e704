"""The trainer end to end: learning bar, torchrun (gloo) equivalence, exact resume, preemption.

Runs are tiny (dim 64, 2 layers, the bytes tokenizer, a few dozen steps, one thread per
process); only the learning bar runs the real debug preset. Most time is interpreter start-up of
the subprocess and torchrun runs, which is why they are `slow`. Helpers here are imported by the
other trainer test files (test_checkpoint, test_distributed, test_metrics).
"""

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lingua_sweep import corpus
from lingua_sweep.config import register_configs
from lingua_sweep.errors import UserError
from lingua_sweep.train import run

REPO = Path(__file__).resolve().parents[1]

# A model that trains in milliseconds per step; every step logged.
TINY = [
    "experiment=debug",
    "cluster=local",
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "data.batch_size=4",
    "data.seq_len=64",
    "optim.warmup=2",
    "logging.freq=1",
    "logging.val_loss_every=3",
    "logging.val_loss_batches=2",
    "steps=6",
]

# fp32 on CPU: one process vs two differ only in the order of the gradient reductions.
RANKS_RTOL = 1e-5


# --- helpers shared by the trainer tests ---------------------------------------------------


def corpus_root(tmp_path_factory=None) -> Path:
    """The embedded corpus in the project's cache: built once (~9 s), kept across sessions.

    Tests name it as a user data root (`data.root=<path>`), which the trainer only reads.
    """
    return corpus.ensure_built()


def run_inprocess(run_dir: Path, *overrides: str, environ=None) -> float:
    """`python train.py overrides` without a new interpreter: Hydra compose + `run`."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return run(cfg, run_dir=run_dir, environ=environ if environ is not None else {})


def child_env(data_root: Path | None = None, **extra: str) -> dict:
    """This environment minus anything that would make a child think it is in Slurm/torchrun."""
    drop = ("SLURM_", "TORCHELASTIC_", "WANDB_")
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LINGUA_CLUSTER")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in names}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun gives each worker: same numerics everywhere
    env["HYDRA_FULL_ERROR"] = "0"
    if data_root is not None:
        env["LINGUA_SWEEP_DATA"] = str(data_root)
    env.update(extra)
    return env


def train_cmd(*overrides: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "train.py", *overrides]
    # --standalone: a rendezvous on a free port, so concurrent test sessions don't collide.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc_per_node={nproc}", "train.py", *overrides]


def train_proc(*overrides: str, env: dict, nproc: int = 1, check: bool = True):
    proc = subprocess.run(
        train_cmd(*overrides, nproc=nproc),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl, strictly: a torn or invalid line fails the test."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def series(records: list[dict], key: str) -> dict[int, float]:
    """{step: value} of one metric; a step logged twice would be a resume bug, so it fails."""
    out = {}
    for r in records:
        if key in r:
            assert r["step"] not in out, f"{key} logged twice at step {r['step']}"
            out[r["step"]] = r[key]
    return out


def interrupt_at_step(step: int, runs: list[tuple[Path, subprocess.Popen, int]]) -> None:
    """Sends each (run_dir, process, signal) its signal once its metrics reach `step`, all
    polled together: no run is interrupted late because another started slowly."""
    deadline = time.monotonic() + 120
    pending = list(runs)
    while pending:
        for run_dir, proc, signum in list(pending):
            assert proc.poll() is None, f"{run_dir}: the run ended before it could be interrupted"
            path = run_dir / "metrics.jsonl"
            if path.exists() and any(r.get("step", 0) >= step for r in _safe_records(path)):
                proc.send_signal(signum)
                pending.remove((run_dir, proc, signum))
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {step} not reached in {[run[0] for run in pending]}")
        time.sleep(0.02)


def _safe_records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written
            out.append(json.loads(line))
    return out


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return corpus_root(tmp_path_factory)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs on one thread, like every child here: on a shared 2-core machine torch's
    default threads spin against other processes (measured: 4x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the debug preset learns ---------------------------------------------------------------


# The preset's model, data and optimizer for half its 200 steps (its schedule fitted to 100):
# the bar is met by step 50 (~0.5x here), and 200 steps were the suite's longest run (~25 s).
LEARNING_BAR_STEPS = 100


@pytest.mark.slow
def test_debug_preset_meets_the_learning_bar(data_root, tmp_path):
    env = child_env(data_root)
    train_proc("experiment=debug", "cluster=local", f"steps={LEARNING_BAR_STEPS}",
               f"hydra.run.dir={tmp_path}", env=env)  # fmt: skip
    records = read_metrics(tmp_path)
    init = series(records, "loss/init")[0]
    val = series(records, "loss/val")
    final = val[max(val)]
    assert max(val) == LEARNING_BAR_STEPS
    assert final <= 0.7 * init, f"final loss/val {final:.3f} vs loss/init {init:.3f}"


# --- config mistakes stop before training ----------------------------------------------------


@pytest.mark.slow
def test_bad_overrides_exit_nonzero_with_a_one_line_cause(data_root, tmp_path):
    """One case per way a command fails before training: Hydra's composition, our preflight,
    the data check at run time. Every preflight rule is checked in process below."""
    cases = {
        "optim.lrr=1": "Key 'lrr' not in 'OptimConfig'",
        "steps=abc": "Value 'abc' of type 'str' could not be converted to Integer",
        # This failed only at the first forward pass, with 40-odd lines of traceback.
        "model.n_kv_heads=3": "error: model.n_kv_heads=3 must divide model.n_heads=4",
        # A data root that does not exist was created and filled with the embedded corpus.
        f"data.root={tmp_path}/no-such-dir": f"error: data root {tmp_path}/no-such-dir does not",
    }
    procs = {}
    for i, overrides in enumerate(cases):  # concurrently: each is mostly interpreter start-up
        cmd = train_cmd(
            "experiment=debug", "cluster=local", *overrides.split(), f"hydra.run.dir={tmp_path}/{i}"
        )
        procs[overrides] = subprocess.Popen(
            cmd, cwd=REPO, env=child_env(data_root), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    for i, (overrides, proc) in enumerate(procs.items()):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, overrides
        assert any(cases[overrides] in line for line in err.splitlines()), (overrides, err)
        assert "Traceback" not in out + err, (overrides, err)
        if cases[overrides].startswith("error:"):  # ours: one line and the usage exit code
            assert proc.returncode == 2 and err.count("\n") == 1, (overrides, err)
        assert not (tmp_path / str(i) / "metrics.jsonl").exists(), overrides
    assert not (tmp_path / "no-such-dir").exists()


def test_the_default_preset_on_a_small_cpu_machine_stops_at_once_naming_the_fix(
    data_root, tmp_path
):
    """`python train.py` here (default preset: ~47 GB at the loss) trained for ~70 s and was
    OOM-killed at 24 GB without a word; the memory preflight stops it before the data."""
    from lingua_sweep import memory

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        tc = OmegaConf.to_object(compose("config", overrides=["cluster=local"]))
    available = memory.local_available_bytes(torch.device("cpu"))
    if torch.cuda.is_available() or available is None:
        pytest.skip("needs a CPU machine that reports its available memory")
    if memory.estimate(tc).total <= memory.HEADROOM * available:
        pytest.skip(f"the default preset fits in this machine's {available / 1e9:.0f} GB")
    start = time.monotonic()
    proc = subprocess.run(
        train_cmd(f"hydra.run.dir={tmp_path}"), cwd=REPO, env=child_env(data_root),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: model needs ~") and "GB of memory per process" in line
    assert "experiment=debug" in line and "data.batch_size" in line
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not (tmp_path / ".lock").exists()  # stopped before the run took its directory


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.scheduler=nope"], "optim.scheduler='nope' is not registered"),
        (["model.vocab_size=5"], "model.vocab_size=5 does not match tokenizer 'bytes'"),
        (["model.n_layers=0"], "model.n_layers=0 must be at least 1"),
        (["model.n_heads=0"], "model.n_heads=0 must be at least 1"),
        (["model.n_kv_heads=3"], "model.n_kv_heads=3 must divide model.n_heads=4"),
        (["model.n_kv_heads=0"], "model.n_kv_heads=0 must divide model.n_heads=4"),
        (["model.dim=132", "model.n_heads=4"], "head dim model.dim/model.n_heads=132/4=33 is odd"),
        (["optim.lr=-1"], "optim.lr=-1.0 must be >= 0"),
        (["optim.beta2=1.5"], r"optim.beta2=1.5 must be in \[0, 1\)"),
        (["optim.warmup=-5"], "optim.warmup=-5 must be >= 0"),
        (["data.batch_size=0"], "data.batch_size=0 and data.seq_len=256 must both be >= 1"),
    ],
)
def test_preflight_rejects_what_the_config_alone_decides(overrides, message):
    from lingua_sweep.preflight import preflight

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=debug", "cluster=local", *overrides])
    with pytest.raises(UserError, match=message) as error:
        preflight(OmegaConf.to_object(cfg))
    assert "\n" not in str(error.value)


# --- data a user configured is only ever read ------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    """Every file under root (and its bytes' sha256): what must not change."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_missing_user_data_is_an_error_and_the_data_is_left_alone(data_root, tmp_path, monkeypatch):
    user = tmp_path / "mydata"
    chunks = user / "fineweb_edu_10bt_shuffled"
    chunks.mkdir(parents=True)
    for n in ("00", "01"):  # no val file: the embedded corpus replaced chunk.00 and added one
        (chunks / f"fineweb_edu_10bt.chunk.{n}.jsonl").write_text('{"text": "my own words"}\n')
    before = tree(user)
    missing_val = rf"val file {chunks}/fineweb_edu_10bt.val.jsonl .*data\.root"
    with pytest.raises(UserError, match=missing_val):
        run_inprocess(tmp_path / "run1", *TINY, f"data.root={user}")
    assert tree(user) == before

    # Through LINGUA_SWEEP_DATA, with the user's own file names: the corpus overwrote val.jsonl.
    monkeypatch.setenv("LINGUA_SWEEP_DATA", str(user))
    (user / "mine").mkdir()
    (user / "mine" / "val.jsonl").write_text('{"text": "my validation"}\n')
    before = tree(user)
    custom = ["data.train_files=mine/*.jsonl.gz", "data.val_file=mine/val.jsonl"]
    with pytest.raises(UserError, match=r"no training files match .*mine/\*\.jsonl\.gz"):
        run_inprocess(tmp_path / "run2", *TINY, *custom)
    assert tree(user) == before

    with pytest.raises(UserError, match=r"data root .*no-such-dir does not exist"):
        run_inprocess(tmp_path / "run3", *TINY, f"data.root={tmp_path}/no-such-dir")
    assert not (tmp_path / "no-such-dir").exists()
    assert not (tmp_path / "run1" / "metrics.jsonl").exists()  # stopped before training


# --- a run owns its directory ----------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from lingua_sweep.train import lock_run_dir
lock = lock_run_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_in_the_same_directory_fails_at_once(data_root, tmp_path):
    """Two runs in one directory crashed on each other's .tmp_step_* dirs and interleaved
    metrics.jsonl. Now the second stops before writing anything, naming the first; the lock
    dies with its holder, so a rerun after a kill (or a requeued job) takes the directory."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO, env=child_env(),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        overrides = [*TINY, f"data.root={data_root}", "steps=2", "checkpoint.dump.every=1"]
        with pytest.raises(UserError) as error:
            run_inprocess(tmp_path, *overrides)
        message = str(error.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "hydra.run.dir" in message and "\n" not in message
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    run_inprocess(tmp_path, *overrides)  # SIGKILL released it
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 2]


# --- write failures are one line naming the path and the reason ------------------------------


def test_an_unwritable_run_dir_is_a_one_line_error(data_root, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UserError) as error:
        run_inprocess(tmp_path / "file" / "run", *TINY, f"data.root={data_root}")
    assert str(error.value).startswith(f"cannot write {tmp_path}/file/run/.lock: not a directory")


def _can_mount_tmpfs() -> bool:
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -m and mount (root)")
def test_a_full_disk_says_so_in_one_line_and_exits_2(data_root, tmp_path):
    """A run dir on a 300 KiB tmpfs: the first checkpoint fills it (74 lines of DCP traceback
    before, which never said why)."""
    mount = tmp_path / "small"
    mount.mkdir()
    cmd = " ".join(
        train_cmd(*TINY, "checkpoint.dump.every=2", f"hydra.run.dir={mount}/run")
    )  # fmt: skip
    script = f"mount -t tmpfs -o size=300k none {mount} && exec {cmd}"
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], cwd=REPO, env=child_env(data_root),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"error: cannot write {mount}/run/checkpoints/.tmp_step_00000002: no space left on "
        "device; free some space there or choose another hydra.run.dir"
    ]


# --- 2 ranks (gloo) vs 1 rank with the same global batch -----------------------------------


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase + "    ") for _ in range(n))


def _write_lines(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def same_global_batch_data(root: Path, *, rows_per_rank: int, seq_len: int) -> tuple[Path, Path]:
    """Two data roots whose batches are the same global batch for 1 rank and for 2 ranks.

    Every document is exactly one rank's micro-batch of bytes tokens (BOS + text + EOS) and all
    lines have one byte length. For 2 ranks a file holds a0..an then b0..bn, so rank 0 reads the
    a's and rank 1 the b's; for 1 rank it holds a0 b0 a1 b1 ..., so its double batch is a_t
    then b_t. The one token a window reads past its end is a BOS in both layouts.
    """
    rng = random.Random(0)
    n_chars = rows_per_rank * seq_len - 2
    train = [(_text(rng, n_chars), _text(rng, n_chars)) for _ in range(24)]
    val = [(_text(rng, n_chars), _text(rng, n_chars)) for _ in range(4)]
    roots = root / "one_rank", root / "two_ranks"
    chunk = "fineweb_edu_10bt_shuffled/fineweb_edu_10bt.chunk.00.jsonl"
    val_file = "fineweb_edu_10bt_shuffled/fineweb_edu_10bt.val.jsonl"
    for name, pairs in ((chunk, train), (val_file, val)):
        _write_lines(roots[0] / name, [t for pair in pairs for t in pair])
        _write_lines(roots[1] / name, [a for a, _ in pairs] + [b for _, b in pairs])
    return roots


EQUIV_STEPS = 40  # long enough for a signal to land mid-run
EQUIV = [
    *TINY, "data.seq_len=32", f"steps={EQUIV_STEPS}", "logging.val_loss_every=10",
    "logging.val_loss_batches=3",
]  # fmt: skip
# 1 row x 2 micro-steps per rank: the same global batch of 4 rows, through the no-sync path;
# 6 val batches of 1 row are the 3 of 2 rows per rank that the other runs evaluate.
FULL_SHARD = [
    *EQUIV, "data.batch_size=1", "optim.grad_acc_steps=2", "logging.val_loss_batches=6",
    "distributed.fsdp_type=full_shard",
]  # fmt: skip


@contextlib.contextmanager
def made_once_per_session(tmp_path_factory, name: str):
    """A directory that this pytest session makes once, whichever of its xdist workers gets
    there first; the others wait for it and reuse it. Yields (dir, whether to make it now);
    the dir counts as made only when the block ends without an error."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's own base temp, above each worker's
    path = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = path / ".made"
        if done.exists():
            yield path, False
            return
        shutil.rmtree(path, ignore_errors=True)  # a worker that failed midway
        path.mkdir()
        yield path, True
        done.touch()


@pytest.fixture(scope="module")
def rank_runs(tmp_path_factory) -> dict[str, Path]:
    """One rank (batch 4), and two ranks no_shard (2 per rank) and full_shard (1 x acc 2 each).

    The no_shard run's directory is named by the microsecond: both ranks must still land in the
    one directory that rank 0 composed. Made once per session: with `-n 2` the tests using it
    may run on both workers, and each made them (~20 s of torchrun, on both cores) before.
    """
    with made_once_per_session(tmp_path_factory, "ranks") as (tmp, make):
        one, two = tmp / "data" / "one_rank", tmp / "data" / "two_ranks"
        runs = {"one": tmp / "one", "no_shard": None, "full_shard": tmp / "full_shard"}
        if make:
            assert (one, two) == same_global_batch_data(tmp / "data", rows_per_rank=2, seq_len=32)
            # The three runs at once (each alone leaves a core idle much of the time: start-up,
            # rank 0's logging, the other rank waiting in a collective).
            two_rank_runs = {
                "no_shard": [
                    *EQUIV, f"data.root={two}", "data.batch_size=2",
                    "distributed.fsdp_type=no_shard", f"dump_base={tmp}/outputs",
                    "hydra.run.dir=${dump_base}/ns/${now:%H-%M-%S.%f}",
                ],
                "full_shard": [
                    *FULL_SHARD, f"data.root={two}", f"hydra.run.dir={runs['full_shard']}",
                ],
            }  # fmt: skip
            procs = {}
            try:
                for name, overrides in two_rank_runs.items():
                    with open(tmp / f"{name}.log", "w") as log:
                        procs[name] = subprocess.Popen(
                            train_cmd(*overrides, nproc=2), cwd=REPO, env=child_env(), stdout=log,
                            stderr=subprocess.STDOUT,
                        )  # fmt: skip
                run_inprocess(runs["one"], *EQUIV, f"data.root={one}", "data.batch_size=4")
            finally:
                codes = {name: proc.wait(timeout=300) for name, proc in procs.items()}
            for name, code in codes.items():
                assert code == 0, (tmp / f"{name}.log").read_text()[-6000:]
    (runs["no_shard"],) = (tmp / "outputs" / "ns").iterdir()  # microseconds, yet one dir
    runs["data_two"] = two
    return runs


@pytest.mark.slow
def test_torchrun_ranks_share_one_run_dir(rank_runs):
    run_dir = rank_runs["no_shard"]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "metrics.jsonl").is_file()
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "hydra.run.dir" not in overrides  # rank 0 wrote .hydra/, not rank 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["no_shard", "full_shard"])
def test_two_ranks_match_one_rank_with_the_same_global_batch(rank_runs, mode):
    ref, got = read_metrics(rank_runs["one"]), read_metrics(rank_runs[mode])
    for key in ("loss/init", "loss/out", "loss/val", "grad_norm"):
        expected, actual = series(ref, key), series(got, key)
        assert expected.keys() == actual.keys(), key
        assert actual == pytest.approx(expected, rel=RANKS_RTOL), key
    assert got[0]["world_size"] == 2 and got[0]["params"] == ref[0]["params"]


@pytest.mark.slow
def test_full_shard_really_shards(rank_runs):
    full = read_metrics(rank_runs["one"])[0]["param_bytes_local"]
    assert read_metrics(rank_runs["no_shard"])[0]["param_bytes_local"] == full
    shard = read_metrics(rank_runs["full_shard"])[0]["param_bytes_local"]
    assert shard == pytest.approx(full / 2, rel=0.02)


@pytest.mark.slow
def test_two_rank_run_stopped_by_sigterm_resumes_exactly(rank_runs, tmp_path):
    """SIGTERM to torchrun (what scancel sends): both workers finish the step, checkpoint
    together and exit 75; the same command again resumes and logs the same losses.

    torchrun itself exits 1 (its SignalException), whatever its workers did, so the workers'
    way out is read from their logs; the one-rank test below checks train.py's exit code.
    """
    run_dir = tmp_path / "run"
    overrides = [*FULL_SHARD, f"data.root={rank_runs['data_two']}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        train_cmd(*overrides, nproc=2), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    interrupt_at_step(2, [(run_dir, proc, signal.SIGTERM)])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    (ckpt,) = (run_dir / "checkpoints").glob("step_*")
    stopped = int(ckpt.name.removeprefix("step_"))
    assert 2 <= stopped < EQUIV_STEPS, out[-3000:]
    assert max(r["step"] for r in read_metrics(run_dir)) == stopped
    # Each rank's train.py logs this line, then exits EX_TEMPFAIL.
    assert out.count(f"preempted by SIGTERM at step {stopped}; checkpoint saved") == 2, out[-3000:]

    train_proc(*overrides, nproc=2, env=child_env())
    ref, got = read_metrics(rank_runs["full_shard"]), read_metrics(run_dir)
    for key in ("loss/init", "loss/out", "loss/val"):
        assert series(got, key) == series(ref, key), key  # bitwise: the same floats in JSON


# --- preemption and exact resume on one rank -----------------------------------------------


@pytest.mark.slow
def test_sigusr2_and_sigterm_checkpoint_exit_75_and_the_rerun_resumes_exactly(data_root, tmp_path):
    """SIGUSR2 (Slurm's warning) or SIGTERM (scancel, the time limit): finish the step,
    checkpoint, exit 75 (EX_TEMPFAIL); the same overrides again resume from that checkpoint
    and log bitwise the losses of a run never interrupted. One run per signal, together."""
    overrides = [*TINY, "steps=40", "logging.val_loss_every=10"]  # long enough to interrupt
    runs = {signum: tmp_path / signum.name for signum in (signal.SIGUSR2, signal.SIGTERM)}
    popen = dict(
        cwd=REPO, env=child_env(data_root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    procs = {
        signum: subprocess.Popen(train_cmd(*overrides, f"hydra.run.dir={run_dir}"), **popen)
        for signum, run_dir in runs.items()
    }
    interrupt_at_step(2, [(runs[signum], proc, signum) for signum, proc in procs.items()])
    # In process, while they checkpoint: bitwise `python train.py`'s run (both on one thread).
    run_inprocess(tmp_path / "uninterrupted", *overrides, f"data.root={data_root}")
    reference = read_metrics(tmp_path / "uninterrupted")

    for signum, run_dir in runs.items():
        out, _ = procs[signum].communicate(timeout=120)
        assert procs[signum].returncode == 75, (signum.name, out[-3000:])
        (ckpt,) = (run_dir / "checkpoints").glob("step_*")
        stopped = int(ckpt.name.removeprefix("step_"))
        assert f"preempted by {signum.name} at step {stopped}; checkpoint saved" in out
        assert max(r["step"] for r in read_metrics(run_dir)) == stopped < 40

        run_inprocess(run_dir, *overrides, f"data.root={data_root}")
        got = read_metrics(run_dir)
        for key in ("loss/init", "loss/out", "loss/val", "grad_norm", "lr"):
            assert series(got, key) == series(reference, key), (signum.name, key)


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    data_root, tmp_path
):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from lingua_sweep.train import NonFiniteLossError

    overrides = [*TINY, f"data.root={data_root}", "steps=30", "optim.lr=1e6"]
    with pytest.raises(NonFiniteLossError, match=r"lower optim\.lr") as error:
        run_inprocess(tmp_path, *overrides, "logging.freq=5", "checkpoint.dump.every=1")
    kept = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert kept and kept[-1].name in str(error.value)
    failed_at = int(str(error.value).split(" at step ")[1].split()[0])
    assert int(kept[-1].name.removeprefix("step_")) < failed_at
    dcp_to_torch_save(kept[-1], tmp_path / "last.pt")
    state = torch.load(tmp_path / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert "\n" not in str(error.value)
