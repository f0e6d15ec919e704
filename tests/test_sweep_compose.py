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
        light = composer.job_config(overrides, num, local, str(tmp_path))
        assert light.hash == config_hash(full), num  # hashed from the template + its values
    assert len(composer.templates) == 2  # the third job adds a key, so it is composed anew
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
        assert str(e.value).endswith("; did you mean optim.lr?")
    with pytest.raises(UserError, match="did you mean cosine"):
        composer.compose(["experiment=debug", "optim.scheduler=cosin"], 0, local, "x")


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


def test_a_template_is_shared_and_never_changed_by_its_jobs(tmp_path, hydra_loader):
    """10,000 jobs of one shape hold one composed config: each job is its values, validated on
    a scratch copy; a wrong value in the 1,000th job still fails in one line."""
    master, loader = hydra_loader
    composer = JobComposer(master, loader)
    local = load_clusters()["local"]
    jobs = [composer.job_config(["experiment=debug", f"optim.lr={lr}", f"steps={s}"], i, local,
                                str(tmp_path))
            for i, (lr, s) in enumerate([(0.001, 10), (0.002, 20), (0.003, 30)])]  # fmt: skip
    assert len({id(j.template) for j in jobs}) == 1
    assert [j.steps for j in jobs] == [10, 20, 30]
    assert [j.materialize().optim.lr for j in jobs] == [0.001, 0.002, 0.003]
    assert jobs[0].template.optim.lr == 0.001  # the first job's, untouched by the others
    assert len({j.hash for j in jobs}) == 3
    with pytest.raises(UserError, match="job #3 .*steps=many"):
        composer.job_config(["experiment=debug", "optim.lr=0.1", "steps=many"], 3, local, "x")


def test_a_dict_or_list_value_is_part_of_the_shape(hydra_loader):
    """It merges into what is there: on a shared template one job's keys would leak into the
    next job's config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    master, loader = hydra_loader
    composer = JobComposer(master, loader)
    parsed = OverridesParser.create().parse_overrides(["a={x:1}", "b=[1,2]", "optim.lr=0.1"])
    assert [composer._is_plain_value(o) for o in parsed] == [False, False, True]
