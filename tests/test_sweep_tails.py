"""Metrics read a piece at a time: only new bytes, unfinished lines kept, a cut-back file
started over, and a few numbers kept per job."""

import json
import math

from lingua_sweep.sweep.tails import FIRST_READ_BYTES, Tail, progress, read_piece, val_losses


def line(step: int, **values) -> str:
    return json.dumps({"step": step, **values}) + "\n"


def test_each_poll_reads_only_what_was_written_since(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(line(1, **{"loss/out": 5.0}) + line(2, **{"loss/out": 4.0}))
    tail = Tail()
    first = read_piece(str(path), tail.offset)
    tail.feed(first)
    assert (tail.step, tail.loss, tail.offset) == (2, 4.0, path.stat().st_size)
    with path.open("a") as f:
        f.write(line(3, **{"loss/val": 3.5}) + '{"step": 4, "loss/o')  # a line being written
    piece = read_piece(str(path), tail.offset)
    assert piece["start"] == first["end"] and piece["text"].startswith('{"step": 3')
    tail.feed(piece)
    assert (tail.step, tail.loss, tail.val) == (3, 3.5, {3: 3.5})
    with path.open("a") as f:
        f.write('ut": 3.0}\n')
    tail.feed(read_piece(str(path), tail.offset))
    assert (tail.step, tail.loss) == (4, 3.0)  # the unfinished line, finished
    assert read_piece(str(path), tail.offset)["text"] == ""  # nothing new: nothing sent


def test_a_file_cut_back_on_resume_is_read_again_from_its_end(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(line(s, **{"loss/out": float(s)}) for s in range(1, 50)))
    tail = Tail()
    tail.feed(read_piece(str(path), None))
    path.write_text(line(1, **{"loss/out": 9.0}))  # the trainer truncated it to its checkpoint
    tail.feed(read_piece(str(path), tail.offset))
    assert (tail.step, tail.loss) == (1, 9.0)


def test_a_long_file_first_read_from_its_end_at_a_line_start(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(line(s, **{"loss/val": 1.0, "pad": "x" * 200})
                            for s in range(1, 3000)))  # fmt: skip
    piece = read_piece(str(path), None)
    assert piece["end"] - piece["start"] <= FIRST_READ_BYTES
    assert piece["text"].startswith('{"step": ')
    tail = Tail()
    tail.feed(piece)
    assert tail.step == 2999 and len(tail.val) < 3000
    assert read_piece(str(tmp_path / "absent.jsonl"), None) is None


def test_the_pruner_and_the_table_read_the_same_values():
    text = line(10, **{"loss/val": 5.0}) + line(20, **{"loss/val": 4.0}) + line(
        30, **{"loss/val": math.nan}) + line(31, **{"loss/out": 2.0})  # fmt: skip
    assert val_losses(text) == {10: 5.0, 20: 4.0}
    assert progress(text) == (31, 2.0)
    tail = Tail()
    tail.feed(text)  # an older agent's whole-tail answer
    assert tail.val == {10: 5.0, 20: 4.0}
