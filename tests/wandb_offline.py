"""Reads an offline WandB run back from disk (the .wandb file), so tests check what was logged.

The file is wandb's header (":W&B", magic, version) followed by LevelDB-log-framed records,
each a serialized `wandb_internal_pb2.Record`.
"""

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7  # ident(4) magic(2) version(1), and also the size of each record's frame header
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def run_info(run_dir: Path) -> dict:
    """name, group, tags and logged history keys of the one offline run under run_dir."""
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline wandb run under {run_dir}"
    info = {"history_keys": set()}
    for record in records(files[-1]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info.update(
                name=record.run.display_name,
                group=record.run.run_group,
                tags=list(record.run.tags),
                project=record.run.project,
            )
        elif kind == "history":
            info["history_keys"].update(
                item.key or "/".join(item.nested_key) for item in record.history.item
            )
    return info
