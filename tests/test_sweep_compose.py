"""Composing jobs: the cached path equals Hydra's own composition; the hash pins a job."""

from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from lingua_sweep.clusters import load_clusters
from lingua_sweep.config import register_configs
from lingua_sweep.errors import UserError
from lingua_sweep.sweep.compose import JobComposer, config_hash, experiment_name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hydra_loader():
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        gh = GlobalHydra.instance()
        master = gh.hydra.compose_config(
            "config", ["experiment=debug", "cluster=local"], run_mode=RunMode.MULTIRUN
        )
        yield master, gh.config_loader()


def test_composer_reuse_equals_a_full_hydra_composition(tmp_path, hydra_loader):
    master, loader = hydra_loader
    composer = JobComposer(master, loader)
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
    assert experiment_name(fast) == "debug"
    with pytest.raises(UserError, match="job #9 .*optim.scheduler='nope'"):
        composer.compose(["experiment=debug", "optim.scheduler=nope"], 9, local, "x")


def test_unknown_keys_fail_with_one_line_naming_the_key(hydra_loader):
    master, loader = hydra_loader
    composer = JobComposer(master, loader)
    local = load_clusters()["local"]
    for typo in ("optim.lrr=1", "+optim.lrr=1"):
        with pytest.raises(UserError) as e:
            composer.compose(["experiment=debug", typo], 0, local, "x")
        assert "lrr" in str(e.value) and "\n" not in str(e.value)
        assert "To append to your config" not in str(e.value)


def test_the_hash_pins_what_a_job_computes_not_where_it_runs(tmp_path, hydra_loader):
    master, loader = hydra_loader
    composer = JobComposer(master, loader)
    registry = load_clusters()
    job = ["experiment=debug", "optim.lr=0.001"]
    here = config_hash(composer.compose(job, 0, registry["local"], str(tmp_path)))
    there = config_hash(composer.compose(job, 0, registry["sphinx"], "/elsewhere"))
    other = config_hash(composer.compose(["experiment=debug", "optim.lr=0.002"], 0,
                                         registry["local"], str(tmp_path)))  # fmt: skip
    assert here == there != other
