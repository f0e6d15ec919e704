import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from lingua_sweep.config import DataConfig, TokenizerConfig
from lingua_sweep.data import (
    build_train_loader,
    build_val_batches,
    check_data_files,
    resolve_data_paths,
)
from lingua_sweep.errors import UserError
from lingua_sweep.tokenizer import build_tokenizer

BOS, EOS = 256, 257  # the bytes tokenizer's


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig(name="bytes"))


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def make_dataset(root, *, n_files=2, docs_per_file=20, val_docs=30, **cfg):
    """The cluster layout under root; returns (cfg, train texts in file order)."""
    sub = root / "fw"
    sub.mkdir(parents=True)
    texts = []
    for f in range(n_files):
        docs = [f"doc {f}-{i}: " + "lorem ipsum " * (i % 5) + "end." for i in range(docs_per_file)]
        write_jsonl(sub / f"fw.chunk.{f:02d}.jsonl", docs)
        texts += docs
    write_jsonl(sub / "fw.val.jsonl", [f"val doc {i} " + "x" * (i % 7) for i in range(val_docs)])
    defaults = dict(batch_size=2, seq_len=16, prefetch=4)
    cfg = DataConfig(
        root=str(root),
        train_files="fw/fw.chunk.*.jsonl",
        val_file="fw/fw.val.jsonl",
        **(defaults | cfg),
    )
    return cfg, texts


def take(loader, n):
    return [next(loader) for _ in range(n)]


def stream_of(batches):
    """Consecutive windows overlap by one token, so the flattened inputs are the token stream."""
    return torch.cat([x.flatten() for x, _ in batches]).tolist()


def docs_in(stream):
    """Complete documents (between BOS and EOS) in a bytes-tokenizer stream."""
    docs, current = [], None
    for t in stream:
        if t == BOS:
            current = []
        elif t == EOS:
            if current is not None:
                docs.append(bytes(current).decode())
            current = None
        elif current is not None:
            current.append(t)
    return docs


def data_threads():
    return [t for t in threading.enumerate() if t.name.startswith("lingua-data")]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --- packing --------------------------------------------------------------------------------


def test_packing_cl100k_real_text(tmp_path):
    cfg, texts = make_dataset(tmp_path, batch_size=3, seq_len=32)
    tok = build_tokenizer(TokenizerConfig(name="cl100k"))
    with build_train_loader(cfg, tok) as loader:
        batches = take(loader, 4)
    for x, y in batches:
        assert x.shape == y.shape == (3, 32)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        assert torch.equal(y[:-1, -1], x[1:, 0])  # rows are consecutive windows of the stream
    expected = []
    for t in texts:
        expected += [tok.bos_id, *tok.encode(t), tok.eos_id]
    stream = stream_of(batches)
    assert stream == expected[: len(stream)]
    decoded = tok.decode(batches[0][0][0].tolist())
    assert decoded.startswith("<|endoftext|>doc 0-0: end.<|endoftext|><|endoftext|>doc 0-1:")


def test_packing_without_bos(tmp_path, tok):
    cfg, texts = make_dataset(tmp_path, add_bos=False)
    with build_train_loader(cfg, tok) as loader:
        stream = stream_of(take(loader, 3))
    expected = b"".join(t.encode() + b"\xff" for t in texts)  # 0xff stands for EOS here
    assert bytes(EOS - 2 if t == EOS else t for t in stream) == expected[: len(stream)]
    assert BOS not in stream


def test_batch_size_argument_overrides_config(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path, batch_size=4)
    with build_train_loader(cfg, tok, batch_size=2) as loader:
        x, y = next(loader)
    assert x.shape == y.shape == (2, cfg.seq_len)


# --- resume ---------------------------------------------------------------------------------


def test_resume_is_exact_across_epochs(tmp_path, tok):
    # ~2 x 20 docs of ~30 bytes = ~1300 tokens per epoch, 32 per batch: 60 batches span 1.5 epochs
    cfg, _ = make_dataset(tmp_path, prefetch=8)
    n = 60
    states, batches = [], []
    with build_train_loader(cfg, tok) as loader:
        for _ in range(n):
            states.append(json.loads(json.dumps(loader.state_dict())))  # must survive JSON
            batches.append(next(loader))
            time.sleep(0.001)  # let the worker run ahead: the state must not follow it
        assert loader.epoch == 1
    assert {s["epoch"] for s in states} == {0, 1}
    for k in range(0, n, 7):
        with build_train_loader(cfg, tok) as resumed:
            resumed.load_state_dict(states[k])
            assert_same(take(resumed, n - k), batches[k:])


def test_state_reflects_consumed_batches_not_prefetched(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path, prefetch=8)
    with build_train_loader(cfg, tok) as loader:
        next(loader)
        time.sleep(0.3)  # the worker fills its queue meanwhile
        state = loader.state_dict()
        expected_next = next(loader)
    with build_train_loader(cfg, tok) as resumed:
        resumed.load_state_dict(state)
        assert_same([next(resumed)], [expected_next])


def test_resume_with_another_batch_size_continues_the_stream(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path)
    with build_train_loader(cfg, tok, batch_size=4) as loader:
        take(loader, 3)
        state = loader.state_dict()
        following = stream_of(take(loader, 2))
    with build_train_loader(cfg, tok, batch_size=2) as resumed:
        resumed.load_state_dict(state)
        assert stream_of(take(resumed, 4)) == following


def test_load_state_dict_after_iterating_restarts_there(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path)
    with build_train_loader(cfg, tok) as loader:
        state = loader.state_dict()
        first = take(loader, 5)
        loader.load_state_dict(state)
        assert_same(take(loader, 5), first)


def test_state_from_another_world_size_is_refused(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path)
    with build_train_loader(cfg, tok, rank=0, world_size=2) as loader:
        state = loader.state_dict()
    with (
        build_train_loader(cfg, tok) as loader,
        pytest.raises(UserError, match="same number of GPUs"),
    ):
        loader.load_state_dict(state)


# --- sharding -------------------------------------------------------------------------------


@pytest.mark.parametrize(("world_size", "n_files"), [(2, 2), (3, 2), (5, 2), (4, 1)])
def test_ranks_see_disjoint_shares_covering_the_dataset(tmp_path, tok, world_size, n_files):
    cfg, texts = make_dataset(tmp_path, n_files=n_files, docs_per_file=12)
    total_tokens = sum(len(t) + 2 for t in texts)
    # Twice the whole dataset's tokens: more than one epoch of any rank's share.
    n_batches = 2 * total_tokens // (cfg.batch_size * cfg.seq_len) + 1
    shares = []
    for rank in range(world_size):
        with build_train_loader(cfg, tok, rank=rank, world_size=world_size) as loader:
            shares.append(set(docs_in(stream_of(take(loader, n_batches)))))
    assert all(shares)
    assert sum(len(s) for s in shares) == len(texts)  # no document seen by two ranks
    assert set.union(*shares) == set(texts)


def test_too_many_ranks_for_the_data(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path, n_files=1, docs_per_file=2)
    with (
        build_train_loader(cfg, tok, rank=2, world_size=3) as loader,
        pytest.raises(UserError, match="no documents for rank 2 of 3"),
    ):
        next(loader)


# --- val --------------------------------------------------------------------------------------


def test_val_batches_are_fixed(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path)
    first = build_val_batches(cfg, tok, n_batches=3)
    second = build_val_batches(cfg, tok, n_batches=3)
    assert len(first) == 3
    assert_same(first, second)
    assert docs_in(stream_of(first))[0] == "val doc 0 "
    other_rank = build_val_batches(cfg, tok, n_batches=3, rank=1, world_size=2)
    assert not set(docs_in(stream_of(first))) & set(docs_in(stream_of(other_rank)))
    # A fresh computation (another tokenizer object, so no cache) gives the same batches.
    fresh = build_val_batches(cfg, build_tokenizer(TokenizerConfig(name="bytes")), n_batches=3)
    assert_same(first, fresh)


def test_val_file_too_small(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path, val_docs=3)
    with pytest.raises(UserError, match="too few tokens"):
        build_val_batches(cfg, tok, n_batches=2, batch_size=64)
    assert 1 <= len(build_val_batches(cfg, tok, n_batches=100)) < 100


# --- errors ---------------------------------------------------------------------------------


def test_checking_data_files_imports_no_torch(tmp_path):
    """The launcher checks paths before submitting; that must stay cheap."""
    cfg, _ = make_dataset(tmp_path)
    code = (
        "import sys\n"
        "from lingua_sweep.config import DataConfig\n"
        "from lingua_sweep.data import check_data_files\n"
        f"check_data_files(DataConfig(root={cfg.root!r}, train_files={cfg.train_files!r}, "
        f"val_file={cfg.val_file!r}))\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with pytest.raises(UserError, match=r"nope.*data\.root="):
        check_data_files(DataConfig(root=str(tmp_path / "nope")))
    assert not (tmp_path / "nope").exists()


def test_missing_paths_name_data_root(tmp_path):
    cfg, _ = make_dataset(tmp_path / "data")
    missing_root = DataConfig(root=str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"nope.*data\.root=.*cluster 'local'"):
        resolve_data_paths(missing_root, cluster="local")
    no_match = DataConfig(root=cfg.root, train_files="fw/other.*.jsonl", val_file=cfg.val_file)
    with pytest.raises(UserError, match=r"fw/other\.\*\.jsonl.*data\.root="):
        resolve_data_paths(no_match)
    no_val = DataConfig(root=cfg.root, train_files=cfg.train_files, val_file="fw/missing.jsonl")
    with pytest.raises(UserError, match=r"missing\.jsonl.*data\.root="):
        resolve_data_paths(no_val)
    files, val = resolve_data_paths(cfg)
    assert [f.name for f in files] == ["fw.chunk.00.jsonl", "fw.chunk.01.jsonl"]
    assert val.name == "fw.val.jsonl"


def _add_bad_lines(cfg, tmp_path):
    path = tmp_path / "fw" / "fw.chunk.01.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = '{"text": "broken\n'  # line 3: not JSON
    lines[4] = '{"body": "no text key"}\n'  # line 5
    path.write_text("".join(lines))
    return path


def test_malformed_line_names_file_and_line(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path)
    path = _add_bad_lines(cfg, tmp_path)
    with build_train_loader(cfg, tok) as loader, pytest.raises(UserError) as info:
        take(loader, 100)
    assert f"{path}:3" in str(info.value)
    assert "data.skip_bad_lines=true" in str(info.value)
    assert not data_threads()


def test_skip_bad_lines_counts_them(tmp_path, tok):
    cfg, texts = make_dataset(tmp_path, skip_bad_lines=True)
    _add_bad_lines(cfg, tmp_path)
    good = set(texts) - {texts[20 + 2], texts[20 + 4]}  # file 1's lines 3 and 5
    assert len(good) == len(texts) - 2
    with build_train_loader(cfg, tok) as loader:
        assert loader.skipped_lines == 0
        seen = set(docs_in(stream_of(take(loader, 60))))
        assert loader.skipped_lines == 2
    assert seen == good


def test_empty_dataset(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path)
    for path in (tmp_path / "fw").glob("*.chunk.*"):
        path.write_text("\n")
    with build_train_loader(cfg, tok) as loader, pytest.raises(UserError, match="no documents"):
        next(loader)


def _next_within(loader, timeout_s: float):
    """next(loader) in a thread: a regression into an endless loop fails instead of hanging."""
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_try(next, loader)), daemon=True)
    worker.start()
    worker.join(timeout_s)
    assert outcome, f"next() did not return within {timeout_s} s"
    return outcome[0]


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # handed back to the test
        return e


@pytest.mark.parametrize("specials", [False, True])
def test_documents_without_tokens_are_an_error_not_an_endless_loop(tmp_path, tok, specials):
    """Empty texts: without BOS/EOS nothing is ever packed (it looped over epochs forever);
    with them every batch would be BOS/EOS alone (it trained on those, silently)."""
    cfg, _ = make_dataset(tmp_path, add_bos=specials, add_eos=specials)
    for path in (tmp_path / "fw").glob("*.chunk.*"):
        write_jsonl(path, [""] * 50)
    with build_train_loader(cfg, tok) as loader:
        error = _next_within(loader, timeout_s=60)
    assert isinstance(error, UserError), error
    assert "no tokens" in str(error) and "fw.chunk." in str(error)


def test_val_file_without_tokens(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path)
    write_jsonl(tmp_path / "fw" / "fw.val.jsonl", [""] * 200)
    with pytest.raises(UserError, match=r"no tokens in .*fw\.val\.jsonl"):
        build_val_batches(cfg, tok, n_batches=2)


def test_mostly_empty_documents_warn_and_the_rest_trains(tmp_path, tok, caplog):
    cfg, _ = make_dataset(tmp_path)
    texts = ["" if i % 4 else f"real text {i}" for i in range(200)]
    for path in (tmp_path / "fw").glob("*.chunk.*"):
        write_jsonl(path, texts)
    with caplog.at_level("WARNING"), build_train_loader(cfg, tok) as loader:
        stream = stream_of(take(loader, 20))
    assert "150 of the first 200 documents" in caplog.text
    assert "real text 0" in docs_in(stream)


def test_tokenizer_without_bos(tmp_path):
    class NoSpecials:  # duck-typed: no encode_batch_numpy, no BOS/EOS
        name, vocab_size, bos_id, eos_id = "nospecials", 256, None, None

        def encode_batch(self, texts):
            return [list(t.encode()) for t in texts]

    cfg, texts = make_dataset(tmp_path)
    with pytest.raises(UserError, match="data.add_bos=false"):
        build_train_loader(cfg, NoSpecials())
    cfg.add_bos = cfg.add_eos = False
    with build_train_loader(cfg, NoSpecials()) as loader:
        x, _ = next(loader)
    assert bytes(x.flatten().tolist()) == "".join(texts).encode()[: x.numel()]


# --- threads --------------------------------------------------------------------------------


def test_close_leaves_no_thread(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path, prefetch=1)
    loader = build_train_loader(cfg, tok)
    loader.close()  # never started
    loader = build_train_loader(cfg, tok)
    next(loader)
    time.sleep(0.2)  # the worker is now blocked on its full queue
    assert len(data_threads()) == 1
    t0 = time.perf_counter()
    loader.close()
    assert time.perf_counter() - t0 < 2
    assert not data_threads()
    loader.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_worker_error_is_reraised_with_its_type(tmp_path, tok):
    class Exploding:
        name, vocab_size, bos_id, eos_id = "exploding", 258, 256, 257

        def encode_batch_numpy(self, texts):
            raise ValueError("tokenizer exploded")

    cfg, _ = make_dataset(tmp_path)
    loader = build_train_loader(cfg, Exploding())
    with pytest.raises(ValueError, match="tokenizer exploded") as info:
        next(loader)
    assert any("encode_batch_numpy" in str(entry) for entry in info.traceback)
    assert not data_threads()  # the worker is gone even before close()
    with pytest.raises(ValueError, match="tokenizer exploded"):
        next(loader)  # and the error stays
    loader.close()


def test_batches_own_their_memory(tmp_path, tok):
    cfg, _ = make_dataset(tmp_path)
    with build_train_loader(cfg, tok) as loader:
        x, y = next(loader)
        x += 1  # batches own their memory: changing one must not change the next
        x2, _ = next(loader)
    assert isinstance(x, torch.Tensor) and not isinstance(x, np.ndarray)
    assert x2[0, 0] == y[-1, -1]


def test_data_identity_changes_with_the_data_and_reads_no_file(tmp_path):
    from lingua_sweep.config import DataConfig
    from lingua_sweep.data import data_identity

    (tmp_path / "train_0.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "val.jsonl").write_text('{"text": "b"}\n')
    cfg = DataConfig(root=str(tmp_path), train_files="train_*.jsonl", val_file="val.jsonl")
    first = data_identity(cfg)
    assert first["train_files"] == 1 and first["val_file"] == str(tmp_path / "val.jsonl")
    assert data_identity(cfg) == first
    (tmp_path / "val.jsonl").write_text('{"text": "bb"}\n')
    assert data_identity(cfg)["fingerprint"] != first["fingerprint"]
