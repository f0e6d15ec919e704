"""The embedded default corpus: real English text every machine already has.

Nothing may be downloaded at run time, so the `local` cluster's data root is the sentinel
`data.root=embedded`: a stand-in for FineWeb-Edu built from the docstrings of the Python standard
library, in the exact layout the clusters use (`*.chunk.00.jsonl` + `*.val.jsonl`), so every
preset and the data loader run unchanged.

It is built once, in a cache directory this project owns (`$LINGUA_SWEEP_CACHE`, else
`$XDG_CACHE_HOME/lingua_sweep`, else `~/.cache/lingua_sweep`), and nowhere else: any other data
root is the user's, and the trainer only ever reads it. A build happens in a temporary directory
renamed into place with its marker file inside, under a lock, so concurrent builders (the jobs of
a local sweep) wait for one build and nobody ever sees half a corpus.
"""

import ast
import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from lingua_sweep.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # the data.root that means "the project's embedded corpus"
CACHE_ENV = "LINGUA_SWEEP_CACHE"
TRAIN_FILE = "fineweb_edu_10bt_shuffled/fineweb_edu_10bt.chunk.00.jsonl"
VAL_FILE = "fineweb_edu_10bt_shuffled/fineweb_edu_10bt.val.jsonl"
MARKER = "EMBEDDED_CORPUS.txt"
MIN_DOC_CHARS = 200
VAL_FRACTION = 0.1


def cache_dir() -> Path:
    """The project's own cache directory (it may not exist yet)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: relative = unset
    return base / "lingua_sweep"


def embedded_dir() -> Path:
    """Where the embedded corpus lives once built (see `ensure_built`)."""
    # Per Python version: the text is that version's stdlib, so another version is another
    # corpus, and a run resumed under it must not find its data silently changed.
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return cache_dir() / "embedded" / version


def is_built() -> bool:
    return (embedded_dir() / MARKER).is_file()


# --- the documents ---------------------------------------------------------------------------


def iter_stdlib_docstrings():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately broken (lib2to3 fixtures etc.)
        nodes = [tree] + [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOC_CHARS:
                yield doc


def build_documents(seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, val) documents, deduplicated and shuffled with a fixed seed."""
    docs = sorted(set(iter_stdlib_docstrings()))
    random.Random(seed).shuffle(docs)
    n_val = max(1, int(len(docs) * VAL_FRACTION))
    return docs[n_val:], docs[:n_val]


def _write_jsonl(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")


# --- building it in the cache ----------------------------------------------------------------


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive flock on `path` (it dies with its process); yields whether it is held."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks: the atomic rename still protects
            log.warning("corpus: cannot lock %s (%s); building without the lock", path, e)
            yield False
            return
        yield True


def ensure_built() -> Path:
    """The embedded corpus's directory, built there on first use (~10 s)."""
    final = embedded_dir()
    if (final / MARKER).is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with _lock(final.parent / f".{final.name}.lock") as locked:
            if (final / MARKER).is_file():  # another process built it while we waited
                return final
            if final.exists():
                raise UserError(
                    f"{final} exists but was not built by lingua_sweep (it has no {MARKER}); "
                    f"move it away, or set {CACHE_ENV}=<dir> for another cache"
                )
            if locked:  # no other builder runs now: leftovers are from killed ones
                for stale in final.parent.glob(f".{final.name}.build-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            _build(final)
    except OSError as e:
        raise UserError(
            f"cannot build the embedded corpus in {final}: {e.strerror or e}; "
            f"set {CACHE_ENV}=<writable dir> or data.root=/path/to/your/data"
        ) from e
    return final


def _build(final: Path) -> None:
    log.info("corpus: building the embedded corpus in %s (once)", final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.build-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the corpus from a shared cache's users
        train, val = build_documents()
        _write_jsonl(tmp / TRAIN_FILE, train)
        _write_jsonl(tmp / VAL_FILE, val)
        (tmp / MARKER).write_text(
            "Stand-in for FineWeb-Edu built by lingua_sweep.corpus from the docstrings of "
            f"Python {sys.version.split()[0]}'s standard library.\n"
            f"{len(train)} train documents, {len(val)} validation documents.\n"
            "lingua_sweep owns this directory; deleting it only costs a rebuild.\n"
        )
        try:
            os.rename(tmp, final)  # atomic: the corpus appears complete or not at all
        except OSError:
            if not (final / MARKER).is_file():  # not a concurrent builder that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install(root: str | Path) -> Path:
    """Copies the embedded corpus into `root` in the clusters' layout; files already there are
    left alone. For test beds and demos only: an explicit act, never done by the trainer."""
    source, root = ensure_built(), Path(root).expanduser()
    for name in (TRAIN_FILE, VAL_FILE):
        dest = root / name
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(source / name, tmp)
        os.replace(tmp, dest)  # concurrent installers each rename a complete file
    return root
