"""The embedded corpus: built only in the project's own cache, atomically, once for everyone.

The real build reads the whole standard library (~5-10 s), so only one test builds into a fresh
cache (two builders racing); the others use the corpus kept in the user's cache across sessions.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lingua_sweep import corpus
from lingua_sweep.config import DataConfig, register_configs
from lingua_sweep.data import check_data_files
from lingua_sweep.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_the_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(corpus.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus.cache_dir() == tmp_path / "xdg" / "lingua_sweep"
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "own"))
    assert corpus.embedded_dir().parent == tmp_path / "own" / "embedded"
    monkeypatch.delenv(corpus.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert corpus.cache_dir() == tmp_path / "home" / ".cache" / "lingua_sweep"


def test_the_local_cluster_defaults_to_the_embedded_corpus(monkeypatch):
    monkeypatch.delenv("LINGUA_SWEEP_DATA", raising=False)
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["cluster=local"])
    assert cfg.data.root == corpus.EMBEDDED
    # ... in the layout of the default data config, so every preset runs unchanged on it
    assert cfg.data.train_files.replace("*", "00") == corpus.TRAIN_FILE
    assert cfg.data.val_file == corpus.VAL_FILE


def test_concurrent_builders_make_one_complete_corpus(tmp_path):
    """The jobs of a local sweep start together: one builds, the others wait for it; a build
    killed half-way earlier leaves nothing that anyone reads."""
    cache = tmp_path / "cache"
    stale = cache / "embedded" / f".{corpus.embedded_dir().name}.build-killed"
    stale.mkdir(parents=True)
    (stale / "half.jsonl").write_text("{")
    env = {**os.environ, corpus.CACHE_ENV: str(cache)}
    code = "from lingua_sweep import corpus; print(corpus.ensure_built())"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    built = cache / "embedded" / corpus.embedded_dir().name
    assert outs == [str(built)] * 2
    assert sorted(os.listdir(built.parent)) == [f".{built.name}.lock", built.name]  # no stale
    assert digests(built) == digests(corpus.ensure_built())  # the same text everywhere


def test_a_foreign_directory_at_the_corpus_path_is_refused_not_replaced(monkeypatch, tmp_path):
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path))
    foreign = corpus.embedded_dir()
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=rf"{foreign} exists but was not built by lingua_sweep"):
        corpus.ensure_built()
    assert digests(foreign) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_the_embedded_root_checks_without_writing_anywhere_else(tmp_path):
    check_data_files(DataConfig(root=corpus.EMBEDDED))  # the default layout: fine
    other = DataConfig(root=corpus.EMBEDDED, train_files="mydata/*.jsonl", val_file="v.jsonl")
    with pytest.raises(UserError, match=r"mydata/\*\.jsonl .*data\.root=embedded.*built-in"):
        check_data_files(other)
    assert not (corpus.embedded_dir() / "mydata").exists()


def test_install_copies_the_corpus_and_keeps_files_already_there(tmp_path):
    val = tmp_path / corpus.VAL_FILE
    val.parent.mkdir(parents=True)
    val.write_text('{"text": "my own validation text"}\n')
    corpus.install(tmp_path)
    assert val.read_text() == '{"text": "my own validation text"}\n'
    source = corpus.ensure_built() / corpus.TRAIN_FILE
    assert (tmp_path / corpus.TRAIN_FILE).read_bytes() == source.read_bytes()
