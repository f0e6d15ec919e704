"""Idle nodes Slurm holds: a cluster's reservations decide where they cover its nodes, and
`sbatch --test-only`'s answer elsewhere."""

import time
from types import SimpleNamespace

import pytest

from lingua_sweep.clusters import ClusterStatus, NodeRoom
from lingua_sweep.config import ClusterConfig
from lingua_sweep.sweep.held import HeldRoom
from lingua_sweep.sweep.params import LauncherParams


def held_room(*, gpus_free=(8, 8)) -> HeldRoom:
    nodes = [NodeRoom(name=f"n{k}", state="idle", free_cpus=64, free_gpus=g)
             for k, g in enumerate(gpus_free)]  # fmt: skip
    status = ClusterStatus(name="a", state="idle", idle_nodes=len(nodes), total_nodes=len(nodes),
                           reason=None, elapsed_s=0.0, nodes=nodes)  # fmt: skip
    config = ClusterConfig(name="a", gpu_type="H100", gpus_per_node=8, data_root="/d",
                           output_root="/o")  # fmt: skip
    controller = SimpleNamespace(links={"a": SimpleNamespace(config=config, status=status)},
                                 p=LauncherParams(timeout_min=60))  # fmt: skip
    return HeldRoom(controller)


def answer(held: HeldRoom, reserved, test_only_in_s: float) -> None:
    """What one probe of cluster `a` (two idle nodes to sinfo) heard from Slurm."""
    backend = SimpleNamespace(reserved_nodes=lambda params: reserved)
    if reserved is None:
        backend = SimpleNamespace()  # no answer: the read fails
    held.read_reservations("a", backend, {"time": 60})
    now = time.time()
    held.note_test_only("a", now + test_only_in_s, now)


def test_a_reservation_the_job_ends_before_leaves_the_room_whatever_test_only_says():
    """--test-only plans the jobs a maintenance holds ahead of ours: it says an hour; the
    reservation begins after our limit, so the nodes are room (the testbed's Slurm started
    such a job at once)."""
    held = held_room()
    # it begins an hour and a minute from now; our limit is an hour
    later = [time.time() + 60, time.time() + 7200]
    answer(held, {"n0": later, "n1": later}, test_only_in_s=3600)
    assert held.usable_room("a", 2) == 2 and held.until("a") is None


def test_a_reservation_within_the_jobs_limit_holds_the_room_until_it_ends():
    held = held_room()
    now = time.time()
    end = now + 7200
    answer(held, {"n0": [now - 60, end], "n1": [now - 60, end + 60]}, test_only_in_s=7200)
    assert held.usable_room("a", 2) == 0
    assert held.until("a") == pytest.approx(end)  # the first node it frees
    # one of the two nodes only: the other is room
    answer(held, {"n0": [now - 60, end], "n1": [now + 60, end]}, test_only_in_s=0)
    assert held.usable_room("a", 2) == 1 and held.until("a") is None
    assert held.usable_room("a", 1) == 1  # a limit of one job: the other node takes it
    # a node with no room left (a job of someone else's on it) costs nothing more
    held = held_room(gpus_free=(8, 0))
    answer(held, {"n1": [now - 60, end]}, test_only_in_s=0)
    assert held.usable_room("a", 1) == 1


def test_without_a_reservation_on_its_nodes_test_only_decides():
    for reserved in (None, {}, {"elsewhere7": [time.time() - 60, time.time() + 600]}):
        held = held_room()
        answer(held, reserved, test_only_in_s=3600)  # nodes kept for a bigger job
        assert held.usable_room("a", 2) == 0, reserved
        assert held.until("a") == pytest.approx(time.time() + 3600, abs=2)
        answer(held, reserved, test_only_in_s=0)  # "now" again
        assert held.usable_room("a", 2) == 2 and held.until("a") is None


def test_a_reservation_on_every_node_is_a_window_no_turn_of_ours_opens_in():
    """A maintenance on both nodes in an hour and a half: a job of ours (one hour's limit)
    cannot start there from 30 minutes from now until it ends; a turn of ours under our limit
    there that comes in that window comes at its end (a job placed for such a turn waited out
    the maintenance). One node left open: no window."""
    held = held_room()
    now = time.time()
    window = [now + 1800, now + 5 * 3600]
    answer(held, {"n0": window, "n1": window}, test_only_in_s=0)
    assert held.blackout("a") == pytest.approx((now + 1800, now + 5 * 3600))
    assert held.usable_room("a", 2) == 2  # a job started now ends before it begins
    answer(held, {"n0": window}, test_only_in_s=0)
    assert held.blackout("a") is None
