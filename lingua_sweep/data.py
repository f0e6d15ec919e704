"""Streaming jsonl data: rank sharding, tokenization, packing, resumable state, prefetch.

Layout: under `data.root`, train chunk files matching the glob `data.train_files` (read in sorted
order, forever: one pass over all of them is an epoch) and one val file `data.val_file`, with one
`{"text": ...}` JSON object per line. A data root is only ever read; the sentinel
`data.root=embedded` is the project's own corpus (corpus.py), built in its cache on first use.

Sharding: every file is cut into world_size contiguous byte ranges and a line belongs to the rank
whose range holds its first byte. Each rank reads only its own bytes, and ranks see disjoint
documents even when there are more ranks than files. The data is already shuffled, so nothing
is shuffled here (`data.seed` is unused) and every epoch repeats the same order.

Packing: each document becomes [bos] + tokens + [eos] (per data.add_bos / data.add_eos) and the
documents of a rank are concatenated into one stream. Row i of a batch is the window
stream[p + i*T : p + (i+1)*T + 1], inputs = window[:-1], targets = window[1:]; the next window
starts T tokens later, so consecutive windows share one token and every token is a target
exactly once (nanoGPT's convention).

State: where the next window starts, as (epoch, file index, byte offset of the line holding the
document, tokens of that document already used). Resuming re-reads and re-tokenizes just that
document, so the state is a few numbers and does not depend on batch_size or seq_len (a run
resumed with another batch size continues the same token stream).

Threading: one background thread per loader reads, parses, tokenizes and packs ahead of the
trainer into a queue of `data.prefetch` batches. The heavy part, tokenization, runs in the
tokenizer's own threads without the GIL (`Tokenizer.encode_batch_numpy`; for tiktoken the same
ids as encode_ordinary_batch, returned as arrays).
"""

from __future__ import annotations  # torch is imported lazily (see _pack)

import glob
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lingua_sweep import corpus
from lingua_sweep.config import DataConfig
from lingua_sweep.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Bytes read and tokenized in one go: large enough to keep the tokenizer's threads busy and
# amortize their start-up, small enough that close() and the first batch come quickly.
BLOCK_BYTES = 1 << 21
STATE_VERSION = 1


# --- paths ----------------------------------------------------------------------------------


def data_root(cfg: DataConfig) -> Path:
    """The directory `data.root` names; `embedded` is the project's corpus, built on first use."""
    if cfg.root == corpus.EMBEDDED:
        return corpus.ensure_built()
    return Path(cfg.root).expanduser()


def resolve_data_paths(cfg: DataConfig, *, cluster: str | None = None) -> tuple[list[Path], Path]:
    """The sorted train files and the val file; UserError naming data.root when any is missing.

    Nothing is created or written: a data root is only ever read. `cluster` (the cluster's name)
    only makes the message say where data.root came from.
    """
    root = data_root(cfg)
    origin = f"data.root={cfg.root}" + (f" from cluster '{cluster}'" if cluster else "")
    fix = "set data.root=/path/to/datasets (it defaults to cluster.data_root)"
    if cfg.root == corpus.EMBEDDED:
        origin = f"data.root={corpus.EMBEDDED}: the built-in corpus in {root}"
        fix = "set data.root=/path/to/your/data to train on your own files"
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist ({origin}); {fix}")
    pattern = str(Path(glob.escape(str(root))) / cfg.train_files)
    val = root / cfg.val_file
    files = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
    if val in files:
        log.warning("data: %s matches data.train_files; it is used for validation only", val)
        files.remove(val)
    if not files:
        shown = root / cfg.train_files
        raise UserError(
            f"no training files match {shown} ({origin}); {fix} or data.train_files=<glob>"
        )
    if not val.is_file():
        raise UserError(f"val file {val} does not exist ({origin}); {fix} or data.val_file=<path>")
    return files, val


def data_identity(cfg: DataConfig) -> dict[str, Any]:
    """What a run trained and validated on, for telling results apart: the val file, how many
    train files, and a fingerprint of their paths, sizes and modification times (cheap: no
    file is read). Two runs with different fingerprints saw different data."""
    import hashlib

    files, val = resolve_data_paths(cfg)
    digest = hashlib.sha1()
    for path in [*files, val]:
        info = path.stat()
        digest.update(f"{path.name}|{info.st_size}|{info.st_mtime_ns}\n".encode())
    return {"val_file": str(val), "train_files": len(files), "fingerprint": digest.hexdigest()[:10]}


def check_data_files(cfg: DataConfig, *, cluster: str | None = None) -> None:
    """UserError (one line, naming the path and data.root) unless the data `cfg` names exists.

    Cheap and torch-free, for a launcher to call before submitting jobs to a machine that sees
    the same filesystem: it reads only directory listings, except that `data.root=embedded`
    builds the project's corpus once (~10 s) in its cache.
    """
    resolve_data_paths(cfg, cluster=cluster)


# --- reading --------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Block:
    """Consecutive documents of one file, with where each one starts, for the resume state."""

    path: Path
    texts: list[str]
    docs: list[tuple[int, int, int, int]]  # (epoch, file index, byte offset, bad lines before)


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line starting at `offset` (only computed for error messages)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(BLOCK_BYTES, offset))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count + 1


def _first_line_start(f, lo: int) -> int:
    """The first line start at or after byte `lo`: a line straddling `lo` is the previous rank's."""
    if lo == 0:
        return 0
    f.seek(lo - 1)
    pos = lo - 1
    while chunk := f.read(1 << 16):
        newline = chunk.find(b"\n")
        if newline >= 0:
            return pos + newline + 1
        pos += len(chunk)
    return pos


def _parse(line: bytes) -> str | None:
    try:
        obj = json.loads(line)
    except ValueError:  # JSONDecodeError and invalid UTF-8 both
        return None
    text = obj.get("text") if isinstance(obj, dict) else None
    return text if isinstance(text, str) else None


def _read_blocks(
    files: list[Path],
    *,
    rank: int,
    world_size: int,
    epoch: int,
    file_index: int,
    offset: int | None,
    skipped: int,
    skip_bad_lines: bool,
    loop: bool,
    stop: threading.Event | None = None,
) -> Iterator[_Block]:
    """This rank's documents, from (epoch, file_index, offset), in blocks of ~BLOCK_BYTES."""
    while True:
        docs_this_epoch = 0
        full_epoch = file_index == 0 and offset is None
        for fi in range(file_index, len(files)):
            path = files[fi]
            size = path.stat().st_size
            lo, hi = size * rank // world_size, size * (rank + 1) // world_size
            with open(path, "rb", buffering=0) as f:
                pos = offset if offset is not None else _first_line_start(f, lo)
                offset = None
                f.seek(pos)
                tail = b""
                while pos < hi:
                    if stop is not None and stop.is_set():
                        return
                    chunk = f.read(BLOCK_BYTES)
                    lines = (tail + chunk).split(b"\n")
                    # Without more bytes the last piece is a final line with no newline.
                    tail = lines.pop() if chunk else b""
                    block = _Block(path=path, texts=[], docs=[])
                    for line in lines:
                        if pos >= hi:
                            break
                        if line.strip():
                            text = _parse(line)
                            if text is not None:
                                block.texts.append(text)
                                block.docs.append((epoch, fi, pos, skipped))
                            elif skip_bad_lines:
                                skipped += 1
                            else:
                                where = f"{path}:{_line_number(path, pos)}"
                                raise UserError(
                                    f'{where}: not a JSON object with a "text" string; fix the '
                                    f"line or set data.skip_bad_lines=true to skip such lines"
                                )
                        pos += len(line) + 1
                    if block.texts:
                        docs_this_epoch += len(block.texts)
                        yield block
                    if not chunk:
                        break
        if full_epoch and docs_this_epoch == 0:
            raise UserError(
                f"no documents for rank {rank} of {world_size} in {len(files)} file(s) starting "
                f"with {files[0]}: the files are empty or hold fewer lines than there are ranks"
            )
        if not loop:
            return
        epoch, file_index, offset = epoch + 1, 0, None
        log.info("data: rank %d starts epoch %d", rank, epoch)


# --- packing --------------------------------------------------------------------------------


def _pack(
    blocks: Iterator[_Block],
    tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    add_bos: bool,
    add_eos: bool,
    token_offset: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """(inputs, targets, state after this batch) from the token stream of `blocks`.

    `token_offset` tokens of the first document are dropped (they were used before a resume).
    """
    import torch  # here, not at the top: the launcher imports this module to check paths

    step = batch_size * seq_len
    prefix = np.array([tokenizer.bos_id] if add_bos else [], dtype=np.int64)
    suffix = np.array([tokenizer.eos_id] if add_eos else [], dtype=np.int64)
    encode = getattr(tokenizer, "encode_batch_numpy", None)
    if encode is None:  # a duck-typed tokenizer without the array variant

        def encode(texts: list[str]) -> list[np.ndarray]:
            return [np.array(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]

    buf = np.empty(0, dtype=np.int64)
    # Documents with tokens still in buf: [(epoch, file, offset, skipped), length, tokens left].
    pending: deque[list] = deque()
    # Documents without a single token would make an endless loop over the epochs, or, with
    # BOS/EOS, a model of those two tokens alone. So no batch is made before the first text
    # token, and a whole epoch without one is an error (the first epoch seen may have begun
    # mid-way, at a resume, so only the ones after it count), as is a non-looping source
    # without one (the val file).
    text_epoch = None  # the last epoch with text (or the first epoch seen)
    seen_text = False
    for block in blocks:
        # Tokenizing here, not ahead in another thread: the tokenizer's threads need the GIL
        # briefly per document, and a thread parsing JSON meanwhile would make them queue for
        # it (measured: 0.6x of raw tokenizer speed overlapped vs. 0.9-1.0x like this).
        block_ids = encode(block.texts)
        epoch = block.docs[0][0]
        empty = sum(1 for ids in block_ids if len(ids) == 0)
        if text_epoch is None:
            text_epoch = epoch
            if empty > len(block_ids) // 2:
                log.warning(
                    "data: %d of the first %d documents in %s are empty (no tokens)",
                    empty, len(block_ids), block.path,
                )  # fmt: skip
        elif epoch > text_epoch + 1:
            raise UserError(
                f"no tokens in the training data: every document of a whole epoch is empty "
                f"(e.g. in {block.path}); check the text fields of data.train_files"
            )
        if empty < len(block_ids):
            text_epoch, seen_text = epoch, True
        parts = []
        for doc, ids in zip(block.docs, block_ids, strict=True):
            n = len(prefix) + len(ids) + len(suffix)
            parts += (prefix, ids, suffix)
            pending.append([doc, n, n])
        new = np.concatenate(parts, dtype=np.int64)
        if token_offset:
            new = new[token_offset:]
            pending[0][2] -= token_offset
            token_offset = 0
        buf = np.concatenate([buf, new]) if len(buf) else new
        while seen_text and len(buf) > step:
            inputs = torch.from_numpy(buf[:step].reshape(batch_size, seq_len).copy())
            targets = torch.from_numpy(buf[1 : step + 1].reshape(batch_size, seq_len).copy())
            buf = buf[step:]
            used = step
            while pending[0][2] <= used:
                used -= pending.popleft()[2]
            pending[0][2] -= used
            (epoch, fi, offset, skipped), length, left = pending[0]
            state = {
                "epoch": epoch,
                "file_index": fi,
                "offset": offset,
                "token_offset": length - left,
                "skipped_lines": skipped,
            }
            yield inputs, targets, state
    if text_epoch is not None and not seen_text:
        raise UserError(
            f"no tokens in {block.path}: every document in it is empty; check its text fields"
        )


# --- train loader ---------------------------------------------------------------------------


class _Failure:
    def __init__(self, error: Exception):
        self.error = error


class TrainLoader:
    """Endless iterator of (inputs, targets) int64 [batch_size, seq_len] batches for one rank.

    `state_dict()` describes the batches consumed so far (not those prefetched); a new loader
    given it with `load_state_dict` yields exactly the batches this one would yield next.
    """

    def __init__(
        self,
        files: list[Path],
        tokenizer,
        *,
        batch_size: int,
        seq_len: int,
        add_bos: bool,
        add_eos: bool,
        prefetch: int,
        skip_bad_lines: bool,
        rank: int,
        world_size: int,
    ):
        self.files = files
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.prefetch = max(1, prefetch)
        self.skip_bad_lines = skip_bad_lines
        self.rank = rank
        self.world_size = world_size
        self.wait_s = 0.0  # time next() spent waiting for the worker: > 0 means data-bound
        self._state = {
            "epoch": 0,
            "file_index": 0,
            "offset": None,  # None: the start of this rank's byte range
            "token_offset": 0,
            "skipped_lines": 0,
        }
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._error: Exception | None = None
        self._closed = False

    @property
    def epoch(self) -> int:
        return self._state["epoch"]

    @property
    def skipped_lines(self) -> int:
        """Malformed lines skipped (data.skip_bad_lines) before the batches consumed so far."""
        return self._state["skipped_lines"]

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._closed:
            raise RuntimeError("TrainLoader is closed")
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._start()
        t0 = time.perf_counter()
        item = self._get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, _Failure):
            self._error = item.error
            self._shutdown()
            raise item.error
        inputs, targets, self._state = item
        return inputs, targets

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "n_files": len(self.files),
            "file": self.files[self._state["file_index"]].name,
            **self._state,
        }

    def load_state_dict(self, state: dict) -> None:
        here = (self.rank, self.world_size, len(self.files))
        saved = (state.get("rank"), state.get("world_size"), state.get("n_files"))
        if state.get("version") != STATE_VERSION or saved != here:
            raise UserError(
                f"data loader state is for (rank, world_size, n_files)={saved}, this run has "
                f"{here}; resume with the same number of GPUs and the same data.train_files"
            )
        name = self.files[state["file_index"]].name
        if state["file"] != name:
            raise UserError(
                f"data loader state points into {state['file']} but train file "
                f"#{state['file_index']} is now {name}; the training files changed since the "
                f"checkpoint: restore them or start a new run"
            )
        self._shutdown()
        self._error = None
        self._state = {k: state[k] for k in self._state}

    def close(self) -> None:
        self._shutdown()
        self._closed = True

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(dict(self._state), self._queue, self._stop),
            name=f"lingua-data-rank{self.rank}", daemon=True,
        )  # fmt: skip
        self._thread.start()

    def _shutdown(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            log.warning("data: worker thread did not stop within 60 s; leaving it (daemon)")
        self._thread = None

    def _get(self):
        # Poll so that a worker that died without reporting can't hang the trainer.
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if self._thread is not None and not self._thread.is_alive():
                    try:
                        return self._queue.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("data loader worker exited without a batch") from None

    def _work(self, state: dict, out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            blocks = _read_blocks(
                self.files,
                rank=self.rank,
                world_size=self.world_size,
                epoch=state["epoch"],
                file_index=state["file_index"],
                offset=state["offset"],
                skipped=state["skipped_lines"],
                skip_bad_lines=self.skip_bad_lines,
                loop=True,
                stop=stop,
            )
            batches = _pack(
                blocks,
                self.tokenizer,
                batch_size=self.batch_size,
                seq_len=self.seq_len,
                add_bos=self.add_bos,
                add_eos=self.add_eos,
                token_offset=state["token_offset"],
            )
            for batch in batches:
                if not put(batch):
                    return
        except Exception as e:  # handed to the consumer, which re-raises it
            put(_Failure(e))


def _check_args(cfg: DataConfig, tokenizer, rank: int, world_size: int, batch_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1 or cfg.seq_len < 1:
        raise UserError(
            f"data.batch_size={batch_size} and data.seq_len={cfg.seq_len} must both be >= 1"
        )
    for flag, token_id in (("add_bos", tokenizer.bos_id), ("add_eos", tokenizer.eos_id)):
        if getattr(cfg, flag) and token_id is None:
            raise UserError(
                f"tokenizer {tokenizer.name!r} has no {flag[4:].upper()} token; "
                f"set data.{flag}=false or use a tokenizer that has one"
            )


def build_train_loader(
    cfg: DataConfig,
    tokenizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
) -> TrainLoader:
    """The loader of this rank's share of the train files; batch_size overrides cfg.batch_size."""
    batch_size = batch_size or cfg.batch_size
    _check_args(cfg, tokenizer, rank, world_size, batch_size)
    files, _ = resolve_data_paths(cfg)
    return TrainLoader(
        files,
        tokenizer,
        batch_size=batch_size,
        seq_len=cfg.seq_len,
        add_bos=cfg.add_bos,
        add_eos=cfg.add_eos,
        prefetch=cfg.prefetch,
        skip_bad_lines=getattr(cfg, "skip_bad_lines", False),
        rank=rank,
        world_size=world_size,
    )


# --- validation batches ---------------------------------------------------------------------

_VAL_CACHE: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def build_val_batches(
    cfg: DataConfig,
    tokenizer,
    *,
    n_batches: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n_batches of this rank's share of the val file: the same ones on every call.

    A val file too small for n_batches gives fewer (with a warning), never repeated data.
    """
    batch_size = batch_size or cfg.batch_size
    _check_args(cfg, tokenizer, rank, world_size, batch_size)
    _, val = resolve_data_paths(cfg)
    stat = val.stat()
    # The tokenizer object itself (hashed by identity) rather than id(): the cache keeps it
    # alive, so its id can't be reused by another tokenizer.
    key = (
        str(val), stat.st_size, stat.st_mtime_ns, tokenizer, n_batches, rank, world_size,
        batch_size, cfg.seq_len, cfg.add_bos, cfg.add_eos,
    )  # fmt: skip
    if key not in _VAL_CACHE:
        skip_bad_lines = getattr(cfg, "skip_bad_lines", False)
        blocks = _read_blocks(
            [val],
            rank=rank,
            world_size=world_size,
            epoch=0,
            file_index=0,
            offset=None,
            skipped=0,
            skip_bad_lines=skip_bad_lines,
            loop=False,
        )
        batches = []
        packed = _pack(
            blocks,
            tokenizer,
            batch_size=batch_size,
            seq_len=cfg.seq_len,
            add_bos=cfg.add_bos,
            add_eos=cfg.add_eos,
            token_offset=0,
        )
        for inputs, targets, _ in packed:
            batches.append((inputs, targets))
            if len(batches) == n_batches:
                break
        if not batches:
            raise UserError(
                f"val file {val} has too few tokens for one batch of {batch_size}x{cfg.seq_len} "
                f"on rank {rank} of {world_size}; use a bigger val file or smaller batches"
            )
        if len(batches) < n_batches:
            log.warning(
                "data: %s holds only %d of the %d val batches asked for (rank %d)",
                val, len(batches), n_batches, rank,
            )  # fmt: skip
        _VAL_CACHE[key] = batches
    return list(_VAL_CACHE[key])
