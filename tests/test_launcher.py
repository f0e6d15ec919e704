"""The multicluster launcher against the real two-cluster testbed (alpha local, beta over ssh)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from wandb_offline import run_info

from lingua_sweep.clusters import ClusterStatus, load_clusters
from lingua_sweep.config import DataConfig
from lingua_sweep.corpus import ensure_embedded_corpus
from lingua_sweep.errors import UserError
from lingua_sweep.launcher import LauncherParams, plan

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=debug",
    "steps=12",
    "logging.freq=4",
    "logging.val_loss_every=6",
    "model.dim=32",
    "model.n_layers=1",
    "data.batch_size=4",
    "data.seq_len=64",
]


def status(name, state, idle):
    return ClusterStatus(
        name=name, state=state, idle_nodes=idle, total_nodes=2, reason=None, elapsed_s=0.0
    )


# --- planning (pure) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry():
    return load_clusters()


def test_plan_fills_idle_nodes_in_priority_order(registry):
    statuses = [
        status("research-secure", "idle", 1),
        status("mk-turbo", "idle", 1),
        status("sphinx", "idle", 2),
        status("miso", "busy", 0),
    ]
    assignment = plan(5, statuses, registry, LauncherParams())
    assert assignment == ["research-secure", "mk-turbo", "sphinx", "sphinx", "research-secure"]


def test_plan_respects_nodes_per_job_and_max_nodes(registry):
    statuses = [
        status("research-secure", "idle", 4),
        status("mk-turbo", "idle", 1),
        status("sphinx", "idle", 2),
    ]
    # 2-node jobs: mk-turbo (max 1 node) can't take any; research-secure fits two.
    assert plan(3, statuses, registry, LauncherParams(nodes=2)) == [
        "research-secure",
        "research-secure",
        "sphinx",
    ]


def test_plan_when_busy_fail_raises_before_submitting(registry):
    statuses = [status("research-secure", "busy", 0), status("sphinx", "unreachable", 0)]
    with pytest.raises(UserError, match="when_busy=queue"):
        plan(2, statuses, registry, LauncherParams(when_busy="fail"))
    assert plan(2, statuses, registry, LauncherParams()) == ["research-secure"] * 2


def test_plan_falls_back_to_local_when_no_slurm_cluster_answers(registry):
    statuses = [status("research-secure", "unreachable", 0), status("local", "local", 1)]
    assert plan(3, statuses, registry, LauncherParams()) == ["local"] * 3


# --- on the testbed -------------------------------------------------------------------------


def sweep(tmp_path: Path, testbed, *args: str, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_", "WANDB_"))}
    env["WANDB_MODE"] = "offline"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        *TINY,
        "hydra/launcher=multicluster",
        f"hydra.searchpath=[file://{testbed.conf_dir}]",
        "hydra.launcher.poll_interval_s=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *args,
    ]
    return subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def sacct_ids(testbed, cluster: str) -> set[str]:
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID", "-S", "now-2hours"]
    if cluster == "alpha":
        out = subprocess.run(
            cmd,
            env={**os.environ, **testbed.env_alpha()},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    else:
        out = subprocess.run(
            ["ssh", "-F", str(testbed.ssh_config), "beta-hn", *cmd],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    return set(out.split())


def hold_alpha_node(testbed) -> str:
    """Occupies one alpha node with a sleeping job; returns its id (scancel it after)."""
    cmd = [
        "sbatch",
        "--parsable",
        "-p",
        "batch",
        "-N1",
        "--exclusive",
        "--output=/dev/null",
        "--wrap",
        "sleep 600",
    ]
    return subprocess.run(
        cmd, env={**os.environ, **testbed.env_alpha()}, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def testbed_with_data(slurm_testbed):
    for name in ("alpha", "beta"):
        root = yaml.safe_load((slurm_testbed.cluster_conf_dir / f"{name}.yaml").read_text())
        ensure_embedded_corpus(DataConfig(root=root["data_root"]))
    return slurm_testbed


@pytest.mark.slurm
def test_sweep_spreads_over_both_clusters_and_keeps_going_past_a_failed_job(
    tmp_path, testbed_with_data
):
    testbed = testbed_with_data
    before = {c: sacct_ids(testbed, c) for c in ("alpha", "beta")}
    # Hold one alpha node, so alpha has idle room for only one of the four jobs.
    holder = hold_alpha_node(testbed)
    try:
        # lr=1e6 diverges: those jobs raise (non-finite loss) while the others complete.
        result = sweep(
            tmp_path,
            testbed,
            "optim.lr=3e-3,1e6",
            "optim.scheduler=cosine,wsd",
            "hydra.launcher.clusters=[alpha,beta]",
            "logging.wandb.mode=offline",
        )
    finally:
        subprocess.run(["scancel", holder], env={**os.environ, **testbed.env_alpha()}, check=False)
    assert result.returncode != 0, "Hydra's sweeper reports the failed jobs at the end"
    new = {c: sacct_ids(testbed, c) - before[c] - {holder} for c in ("alpha", "beta")}
    assert new["alpha"] and new["beta"], (new, result.stderr[-3000:])

    sweep_dir = tmp_path / "sweep"
    statuses = {}
    for job in range(4):
        job_dir = sweep_dir / str(job)
        st = json.loads((job_dir / "status.json").read_text())
        statuses[job] = st["status"]
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        lr = next(float(o.split("=")[1]) for o in overrides if o.startswith("optim.lr="))
        if lr > 1:
            assert st["status"] == "FAILED" and "loss is" in st["error"], st
            continue
        assert st["status"] == "COMPLETED", st
        assert st["cluster"] in ("alpha", "beta")
        info = run_info(job_dir)
        assert info["group"] == f"debug/{st['cluster']}"
        assert info["name"] == f"debug_{st['cluster']}_{st['job_id']}"
        assert info["tags"] == ["testbed", st["cluster"], "cpu", "debug", f"job_{st['job_id']}"]
        lines = (job_dir / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["step"] == 12
    assert sorted(statuses.values()) == ["COMPLETED", "COMPLETED", "FAILED", "FAILED"]
    assert {
        json.loads((sweep_dir / str(j) / "status.json").read_text())["cluster"] for j in range(4)
    } == {"alpha", "beta"}
    table = results_rows(sweep_dir)
    assert sorted(r["status"] for r in table) == ["COMPLETED", "COMPLETED", "FAILED", "FAILED"]
    assert all("loss is nan" in r["error"] for r in table if r["status"] == "FAILED")


@pytest.mark.slurm
def test_dry_run_submits_nothing(tmp_path, testbed_with_data):
    before = {c: sacct_ids(testbed_with_data, c) for c in ("alpha", "beta")}
    result = sweep(
        tmp_path,
        testbed_with_data,
        "optim.lr=1e-3,3e-3",
        "hydra.launcher.clusters=[alpha,beta]",
        "hydra.launcher.dry_run=true",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "multicluster: jobs" in result.stderr
    assert {c: sacct_ids(testbed_with_data, c) for c in ("alpha", "beta")} == before


@pytest.mark.slurm
@pytest.mark.parametrize(
    "bad, message",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optim.scheduler=cosine,nope", "optim.scheduler='nope' is not registered"),
        ("model.vocab_size=5", "does not match tokenizer"),
    ],
)
def test_bad_override_submits_nothing(tmp_path, testbed_with_data, bad, message):
    before = {c: sacct_ids(testbed_with_data, c) for c in ("alpha", "beta")}
    result = sweep(tmp_path, testbed_with_data, bad, "hydra.launcher.clusters=[alpha,beta]")
    assert result.returncode != 0
    assert message in result.stderr
    assert {c: sacct_ids(testbed_with_data, c) for c in ("alpha", "beta")} == before


def test_sweep_without_slurm_runs_on_the_local_cluster(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_"))}
    env["LINGUA_SWEEP_DATA"] = str(tmp_path / "data")
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        *TINY,
        "steps=4",
        "optim.lr=1e-3,3e-3",
        "hydra/launcher=multicluster",
        "hydra.launcher.clusters=[local]",
        "hydra.launcher.poll_interval_s=0.5",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in range(2):
        st = json.loads((tmp_path / "sweep" / str(job) / "status.json").read_text())
        assert st["status"] == "COMPLETED" and st["cluster"] == "local"
        assert isinstance(st["return_value"], float)


def results_rows(sweep_dir: Path) -> list[dict]:
    import csv
    import io

    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "lingua-sweep"),
            "results",
            str(sweep_dir),
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return list(csv.DictReader(io.StringIO(out)))


@pytest.mark.slurm
def test_optuna_lr_search_runs_trials_on_the_clusters_and_lands_in_the_results_table(
    tmp_path, testbed_with_data
):
    result = sweep(
        tmp_path,
        testbed_with_data,
        "hydra/sweeper=lr_search",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "hydra.launcher.clusters=[alpha,beta]",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert 1e-4 <= best["best_params"]["optim.lr"] <= 1e-2
    rows = results_rows(tmp_path / "sweep")
    assert len(rows) == 4
    assert {r["status"] for r in rows} == {"COMPLETED"}
    values = [float(r["final_val_loss"]) for r in rows]
    assert min(values) == pytest.approx(best["best_value"])


@pytest.mark.slurm
def test_ctrl_c_cancels_the_submitted_jobs(tmp_path, testbed_with_data):
    import signal
    import time

    testbed = testbed_with_data
    alpha_env = {**os.environ, **testbed.env_alpha()}
    holders = [hold_alpha_node(testbed) for _ in range(2)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_"))}
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        *TINY,
        "optim.lr=1e-3,3e-3",
        "hydra/launcher=multicluster",
        f"hydra.searchpath=[file://{testbed.conf_dir}]",
        "hydra.launcher.clusters=[alpha]",
        "hydra.launcher.poll_interval_s=0.5",
        "hydra.launcher.timeout_min=5",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        queued: list[str] = []
        deadline = time.monotonic() + 120
        while len(queued) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            out = subprocess.run(
                ["squeue", "-h", "-r", "-t", "PD", "-o", "%i"],
                env=alpha_env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            queued = [i for i in out.split() if i not in holders]
        assert len(queued) == 2, "the sweep's jobs never showed up in alpha's queue"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        subprocess.run(["scancel", *holders], env=alpha_env, check=False)
    assert "cancelled 2 jobs on alpha" in output
    out = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i"],
        env=alpha_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert not set(queued) & set(out.split())


def test_composer_reuse_equals_a_full_hydra_composition(tmp_path):
    from types import SimpleNamespace

    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from lingua_sweep.config import register_configs
    from lingua_sweep.launcher import JobComposer

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        gh = GlobalHydra.instance()
        master = gh.hydra.compose_config(
            "config", ["experiment=debug", "cluster=local"], run_mode=RunMode.MULTIRUN
        )
        loader = gh.config_loader()
        composer = JobComposer(
            SimpleNamespace(hydra_context=SimpleNamespace(config_loader=loader), config=master)
        )
        local = load_clusters()["local"]
        jobs = [
            ["experiment=debug", "optim.lr=0.001", "optim.scheduler=cosine"],
            ["experiment=debug", "optim.lr=0.003", "optim.scheduler=wsd"],
            ["experiment=debug", "optim.lr=0.01", "optim.scheduler=wsd", "model.norm=layernorm"],
        ]
        for num, overrides in enumerate(jobs):
            fast = composer.compose(overrides, num, local, str(tmp_path))
            full = loader.load_sweep_config(
                master, [*overrides, "cluster=local", f"hydra.sweep.dir={tmp_path}"]
            )
            with open_dict(full.hydra.job):
                full.hydra.job.num = num
            assert OmegaConf.to_container(fast) == OmegaConf.to_container(full), num
        assert len(composer.cache) == 2  # the third job adds a key, so it is composed anew
        with pytest.raises(UserError, match="job #9 .*optim.scheduler='nope'"):
            composer.compose(["experiment=debug", "optim.scheduler=nope"], 9, local, "x")
