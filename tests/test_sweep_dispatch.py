"""Dispatch: capacity in the job's own units, priority order, when_busy, moving (pure)."""

import pytest

from lingua_sweep.clusters import (
    ClusterStatus,
    NodeRoom,
    count_gpus,
    load_clusters,
    parse_sinfo_node,
)
from lingua_sweep.errors import UserError
from lingua_sweep.sweep import dispatch
from lingua_sweep.sweep.params import LauncherParams


@pytest.fixture(scope="module")
def registry():
    return load_clusters()


def status(name, *nodes, state="idle"):
    rooms = [NodeRoom(name=f"n{i}", state="idle", free_cpus=c, free_gpus=g)
             for i, (c, g) in enumerate(nodes)]  # fmt: skip
    return ClusterStatus(name=name, state=state, idle_nodes=len(nodes), total_nodes=len(nodes),
                         reason=None, elapsed_s=0.0, nodes=rooms)  # fmt: skip


def test_sinfo_lines_give_free_cpus_and_gpus():
    node = parse_sinfo_node("x1|mix|6/2/0/8|gpu:4(S:0)|gpu:1(IDX:0)|")
    assert (node.name, node.state, node.free_cpus, node.free_gpus) == ("x1", "mix", 2, 3)
    down = parse_sinfo_node("x2|drain|0/8/0/8|gpu:4|gpu:0|")
    assert (down.free_cpus, down.free_gpus) == (0, 0)  # a drained node offers nothing
    assert count_gpus("gpu:a100:8(S:0-1),shard:4") == 8
    assert count_gpus("(null)") == 0


def test_job_shape_is_one_task_per_gpu_and_follows_the_launcher(registry):
    research = registry["research-secure"]
    assert dispatch.job_shape(research, LauncherParams()).tasks == 8
    shape = dispatch.job_shape(research, LauncherParams(nodes=2, gpus_per_node=1))
    assert (shape.nodes, shape.gpus_per_node, shape.tasks_per_node, shape.tasks) == (2, 1, 1, 2)
    params = dispatch.sbatch_params(research, LauncherParams(gpus_per_node=2), job_name="x")
    assert (params["gpus_per_node"], params["ntasks_per_node"], params["partition"]) == (
        2,
        2,
        "batch",
    )
    assert dispatch.job_shape(registry["local"], LauncherParams(nodes=3)).tasks == 1


def test_room_counts_gpus_per_job_not_nodes(registry):
    research = registry["research-secure"]
    cluster = status("research-secure", (64, 8), (64, 3))  # one idle node, one with 3 free GPUs
    assert (
        dispatch.room(
            cluster,
            research,
            dispatch.JobShape(nodes=1, gpus_per_node=8, tasks_per_node=8, cpus_per_task=1),
        )
        == 1
    )
    assert (
        dispatch.room(
            cluster,
            research,
            dispatch.JobShape(nodes=1, gpus_per_node=1, tasks_per_node=1, cpus_per_task=1),
        )
        == 11
    )
    assert (
        dispatch.room(
            cluster,
            research,
            dispatch.JobShape(nodes=2, gpus_per_node=2, tasks_per_node=2, cpus_per_task=1),
        )
        == 1
    )
    # CPU partitions count CPUs; a job bigger than max_nodes fits nowhere.
    cpu = status("research-secure", (4, 0), (4, 0))
    assert (
        dispatch.room(
            cpu,
            research,
            dispatch.JobShape(nodes=1, gpus_per_node=0, tasks_per_node=2, cpus_per_task=1),
        )
        == 4
    )
    assert (
        dispatch.room(
            cpu,
            research,
            dispatch.JobShape(nodes=5, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1),
        )
        == 0
    )
    assert (
        dispatch.room(
            status("x", (4, 0), state="unreachable"),
            research,
            dispatch.JobShape(nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1),
        )
        == 0
    )


def test_assign_fills_room_in_priority_order_then_follows_when_busy():
    order = ["research-secure", "mk-turbo", "sphinx"]
    rooms = {"research-secure": 1, "mk-turbo": 0, "sphinx": 2}
    assert dispatch.assign(5, rooms, order, queue_on="research-secure", when_busy="queue") == [
        "research-secure", "sphinx", "sphinx", "research-secure", "research-secure",
    ]  # fmt: skip
    assert dispatch.assign(4, rooms, order, queue_on="research-secure", when_busy="wait") == [
        "research-secure", "sphinx", "sphinx", None,
    ]  # fmt: skip
    with pytest.raises(UserError, match="when_busy=queue"):
        dispatch.check_when_busy(1, 4, order, "fail")
    dispatch.check_when_busy(0, 4, order, "fail")


def test_a_job_moves_once_and_only_where_there_is_room():
    assert dispatch.should_move(700, 0, 600, {"beta": 1})
    assert not dispatch.should_move(500, 0, 600, {"beta": 1})  # not long enough
    assert not dispatch.should_move(700, 1, 600, {"beta": 1})  # moved already
    assert not dispatch.should_move(700, 0, 600, {"beta": 0})  # nowhere better
    assert not dispatch.should_move(700, 0, None, {"beta": 1})  # moving disabled
