"""Data loader throughput vs. raw tiktoken on the same text with the same thread count.

    python bench/data_loader.py [--mb 8] [--repeats 5]

The text is the docstrings of the Python standard library (its triple-quoted strings, found with
a regex so that no module is imported), cut into documents of about 3 KB, repeated up to --mb,
and written as jsonl in the cluster layout. Raw `encode_ordinary_batch` over all documents and a
full epoch of the train loader are timed alternately (the machine may be shared; best of
--repeats each). Prints both tokens/s and their ratio (target >= 0.8).
"""

import argparse
import inspect
import json
import re
import sysconfig
import tempfile
import time
from pathlib import Path

from lingua_sweep.config import DataConfig, TokenizerConfig
from lingua_sweep.data import build_train_loader
from lingua_sweep.tokenizer import build_tokenizer

TRIPLE_QUOTED = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.DOTALL)


def stdlib_documents(max_bytes: int, doc_bytes: int = 3000) -> list[str]:
    """Stdlib docstrings joined into documents of about doc_bytes, repeated up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, current = [], []
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a few test fixtures are deliberately not UTF-8
        for match in TRIPLE_QUOTED.finditer(source):
            text = inspect.cleandoc(match.group(1) or match.group(2) or "")
            if text:
                current.append(text)
            if sum(map(len, current)) >= doc_bytes:
                docs.append("\n\n".join(current))
                current = []
    total = sum(map(len, docs))
    return docs * max(1, round(max_bytes / total))


def write_layout(root: Path, docs: list[str]) -> DataConfig:
    sub = root / "stdlib_docs"
    sub.mkdir(parents=True)
    half = len(docs) // 2
    for name, part in (("chunk.00", docs[:half]), ("chunk.01", docs[half:]), ("val", docs[:10])):
        with open(sub / f"stdlib_docs.{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in part)
    return DataConfig(
        root=str(root),
        train_files="stdlib_docs/stdlib_docs.chunk.*.jsonl",
        val_file="stdlib_docs/stdlib_docs.val.jsonl",
        batch_size=8,
        seq_len=1024,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    tokenizer = build_tokenizer(TokenizerConfig(name="cl100k"))
    encoding, threads = tokenizer.encoding, tokenizer.num_threads
    docs = stdlib_documents(int(args.mb * 1e6))
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"{len(docs)} documents, {n_bytes / 1e6:.1f} MB, {threads} tokenizer threads")

    n_tokens = sum(map(len, encoding.encode_ordinary_batch(docs, num_threads=threads)))
    # One epoch of the loader's stream: the text's tokens plus a BOS and an EOS per document.
    stream = n_tokens + 2 * len(docs)
    raw_s, loader_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_layout(Path(tmp), docs)
        per_batch = cfg.batch_size * cfg.seq_len
        n_batches = stream // per_batch
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            encoding.encode_ordinary_batch(docs, num_threads=threads)
            raw_s.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            with build_train_loader(cfg, tokenizer) as loader:
                for _ in range(n_batches):
                    next(loader)
            loader_s.append(time.perf_counter() - t0)

    raw_tps = n_tokens / min(raw_s)
    # Count text tokens only, as the raw encoder does (BOS/EOS are the loader's own additions).
    loader_tps = n_batches * per_batch * (n_tokens / stream) / min(loader_s)
    print(f"raw encode_ordinary_batch: {raw_tps / 1e6:.3f} M tokens/s (best of {args.repeats})")
    print(f"train loader:              {loader_tps / 1e6:.3f} M tokens/s (best of {args.repeats})")
    print(f"ratio loader / raw:        {loader_tps / raw_tps:.3f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
