"""The embedded default corpus: real English text every machine already has.

Nothing may be downloaded at run time, so on the `local` cluster the trainer builds a stand-in
for FineWeb-Edu from the docstrings of the Python standard library and writes it in the exact
layout the clusters use (`*.chunk.00.jsonl` + `*.val.jsonl`), so every preset and the data
loader run unchanged. Built once, atomically, into the local cluster's data root.
"""

import ast
import json
import os
import random
import sysconfig
import tempfile
from pathlib import Path

from lingua_sweep.config import DataConfig

MARKER = "EMBEDDED_CORPUS.txt"
MIN_DOC_CHARS = 200
VAL_FRACTION = 0.1


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


def _write_jsonl_atomic(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    os.replace(tmp, path)  # concurrent builders (a local sweep) each rename a complete file


def ensure_embedded_corpus(cfg: DataConfig) -> bool:
    """Builds the corpus under `cfg.root` unless training files are already there.

    Returns True when it built something.
    """
    root = Path(cfg.root)
    if list(root.glob(cfg.train_files)) and (root / cfg.val_file).exists():
        return False
    train, val = build_documents()
    train_path = root / cfg.train_files.replace("*", "00")
    _write_jsonl_atomic(train_path, train)
    _write_jsonl_atomic(root / cfg.val_file, val)
    (root / MARKER).write_text(
        "Stand-in for FineWeb-Edu built by lingua_sweep.corpus from Python stdlib docstrings.\n"
        f"{len(train)} train documents, {len(val)} validation documents.\n"
    )
    return True
