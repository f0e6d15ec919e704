"""Running jobs' metrics.jsonl, a piece at a time: each poll brings only the bytes written since
the last one (the agent reads from an offset), parsed once here into what the live view and the
pruner need (last step and loss, the val losses), and dropped when the job ends. A launcher
watching a hundred jobs for a week keeps a few numbers per job, and a poll over ssh carries
only what is new."""

import math
import os
from dataclasses import dataclass, field
from typing import Any

from lingua_sweep.metrics import parse_records

FIRST_READ_BYTES = 200_000  # a job first seen mid-run: the end of its file is enough
MAX_READ_BYTES = 2_000_000  # more new bytes than this in one poll: skip to their end
REPORTED_KEY = "loss/val"  # what the pruner is told, by step
LOSS_KEYS = ("loss/val", "loss/out", "loss/init")  # the live view's loss, first found


def read_piece(path: str, offset: int | None) -> dict[str, Any] | None:
    """On the cluster: the bytes of `path` from `offset` (None, or past the end because the
    file was cut back on a resume: its last FIRST_READ_BYTES, from a line start). None when the
    file does not exist. {"start", "end": byte offsets, "text"}."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if offset is None or offset > size:
                start = max(0, size - FIRST_READ_BYTES)
            else:
                start = max(offset, size - MAX_READ_BYTES)
            f.seek(start)
            data = f.read(size - start)
    except OSError:
        return None
    if start > 0 and start != offset:  # landed mid-line: begin at the next line
        cut = data.find(b"\n") + 1
        start, data = start + cut, data[cut:]
    return {"start": start, "end": start + len(data), "text": data.decode(errors="replace")}


@dataclass
class Tail:
    """What has been read of one job's metrics.jsonl, and what it said."""

    offset: int | None = None  # bytes consumed; None: never read
    partial: str = ""  # an unfinished last line, finished by the next piece
    step: int | None = None
    loss: float | None = None
    val: dict[int, float] = field(default_factory=dict)  # step -> finite loss/val

    def feed(self, piece: dict[str, Any] | str | None) -> None:
        if piece is None:
            return
        if isinstance(piece, str):  # an agent from before offsets: the file's end, whole
            piece = {"start": None, "end": None, "text": piece}
        if piece["start"] != self.offset:
            self.partial = ""  # not where we left off (first read, or the file was cut back)
        lines = (self.partial + piece["text"]).split("\n")
        self.partial = lines.pop()
        self.offset = piece["end"]
        for record in parse_records("\n".join(lines)):
            self.step = record["step"]
            loss = next((record[k] for k in LOSS_KEYS if _number(record.get(k))), None)
            if loss is not None:
                self.loss = loss
            value = record.get(REPORTED_KEY)
            if _number(value) and math.isfinite(value):
                self.val[record["step"]] = float(value)


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def val_losses(metrics_text: str | None) -> dict[int, float]:
    """{step: loss/val} of a metrics.jsonl text; non-finite values skipped."""
    tail = Tail()
    tail.feed({"start": None, "end": None, "text": (metrics_text or "") + "\n"})
    return tail.val


def progress(metrics_text: str | None) -> tuple[int | None, float | None]:
    """(last step, last loss) of a metrics.jsonl text."""
    tail = Tail()
    tail.feed({"start": None, "end": None, "text": (metrics_text or "") + "\n"})
    return tail.step, tail.loss
