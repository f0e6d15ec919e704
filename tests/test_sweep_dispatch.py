"""Dispatch: capacity in the job's own units, priority order, when_busy, moving (pure)."""

import subprocess
import sys
from pathlib import Path

import pytest
from sweep_helpers import (
    clean_env,
    hold_node,
    journal_records,
    one_job_per_node,
    sacct_jobs,
    slurm,
    wait_for,
)

from lingua_sweep.clusters import (
    ClusterStatus,
    NodeRoom,
    count_gpus,
    load_clusters,
    parse_sinfo_node,
)
from lingua_sweep.errors import UserError
from lingua_sweep.sweep import dispatch, shape
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
    # planned for a pending job: Slurm still starts a job there that ends before that one
    planned = parse_sinfo_node("x3|plnd|0/8/0/8|gpu:4|gpu:0|")
    assert (planned.free_cpus, planned.free_gpus) == (8, 4)
    assert count_gpus("gpu:a100:8(S:0-1),shard:4") == 8
    assert count_gpus("(null)") == 0


def test_job_shape_is_one_task_per_gpu_and_follows_the_launcher(registry):
    research = registry["research-secure"]
    assert shape.job_shape(research, LauncherParams()).tasks == 8
    two = shape.job_shape(research, LauncherParams(nodes=2, gpus_per_node=1))
    assert (two.nodes, two.gpus_per_node, two.tasks_per_node, two.tasks) == (2, 1, 1, 2)
    params = shape.sbatch_params(research, LauncherParams(gpus_per_node=2), job_name="x")
    assert (params["gpus_per_node"], params["ntasks_per_node"], params["partition"]) == (
        2,
        2,
        "batch",
    )
    assert shape.job_shape(registry["local"], LauncherParams(nodes=3)).tasks == 1


def test_room_counts_gpus_per_job_not_nodes(registry):
    research = registry["research-secure"]
    cluster = status("research-secure", (64, 8), (64, 3))  # one idle node, one with 3 free GPUs
    assert (
        shape.room(
            cluster,
            research,
            shape.JobShape(nodes=1, gpus_per_node=8, tasks_per_node=8, cpus_per_task=1),
        )
        == 1
    )
    assert (
        shape.room(
            cluster,
            research,
            shape.JobShape(nodes=1, gpus_per_node=1, tasks_per_node=1, cpus_per_task=1),
        )
        == 11
    )
    assert (
        shape.room(
            cluster,
            research,
            shape.JobShape(nodes=2, gpus_per_node=2, tasks_per_node=2, cpus_per_task=1),
        )
        == 1
    )
    # CPU partitions count CPUs; a job bigger than max_nodes fits nowhere.
    cpu = status("research-secure", (4, 0), (4, 0))
    assert (
        shape.room(
            cpu,
            research,
            shape.JobShape(nodes=1, gpus_per_node=0, tasks_per_node=2, cpus_per_task=1),
        )
        == 4
    )
    assert (
        shape.room(
            cpu,
            research,
            shape.JobShape(nodes=5, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1),
        )
        == 0
    )
    assert (
        shape.room(
            status("x", (4, 0), state="unreachable"),
            research,
            shape.JobShape(nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1),
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


# --- live, on the testbed --------------------------------------------------------------------

RANK_APP = Path(__file__).resolve().parent / "apps" / "rank_app.py"


def test_new_room_goes_to_the_jobs_waiting_here_before_a_pending_job_moves_into_it():
    """b's one slot frees; job #5 has pended 700 s on a. A job still waiting here takes the
    slot at the next dispatch, so #5 stays where it is: moved, it would wait a whole run behind
    that job (limits, seed 2: 925 s)."""
    import time
    from types import SimpleNamespace

    from lingua_sweep.sweep.journal import QUEUED, JobEntry

    now = time.time()
    pending = JobEntry(index=5, overrides=[], config_hash="p", state="PENDING", cluster="a",
                       submitted_at=now - 700, reason="Priority")  # fmt: skip
    slurm_cluster = SimpleNamespace(slurm=True)

    def moved(*waiting_here: JobEntry, held: str | None = None) -> list[tuple[int, str]]:
        c = SimpleNamespace(
            p=LauncherParams(placement="priority", max_pending_s=600), composer=object(),
            registry={"a": slurm_cluster, "b": slurm_cluster, "c": slurm_cluster},
            links={"a": None, "b": None, "c": None},
            jobs=lambda state: {"PENDING": [pending], QUEUED: list(waiting_here)}.get(state, []),
            watcher=SimpleNamespace(pending_seen={5: now}),
        )  # fmt: skip
        d = dispatch.Dispatcher(c)
        d.probe = lambda: None
        # b's room as counted (ours bound for it, a job moved there, left out already)
        d.rooms = lambda: {"a": 0, "b": 1, "c": 0} if held is None else {"a": 0, "b": 1, "c": 1}
        # room Slurm holds on `held` (a reservation's idle nodes): none
        d.forecaster.slurm.usable = lambda rooms: {
            n: 0 if n == held else r for n, r in rooms.items()
        }
        out = []
        d._move = lambda job, target, note: out.append((job.index, target))
        d.move_long_pending()
        return out

    def waiting(index: int, target: str | None = None) -> JobEntry:
        return JobEntry(index=index, overrides=[], config_hash=str(index), state=QUEUED,
                        target=target)  # fmt: skip

    assert moved() == [(5, "b")]
    assert moved(waiting(2)) == [] and moved(waiting(7)) == []
    assert moved(waiting(2, target="b")) == [(5, "b")]  # bound for b: in b's count already
    # b's idle nodes are held (a reservation): the job waiting here takes c's room, and #5
    # stays where it is
    assert moved(held="b") == [(5, "c")]
    assert moved(waiting(2), held="b") == []


def app_sweep_cmd(testbed, sweep_dir, *args):
    return [
        sys.executable, str(RANK_APP), "-m", "hydra/launcher=multicluster",
        f"hydra.searchpath=[file://{testbed.conf_dir}]", "hydra.launcher.poll_interval_s=1",
        "hydra.launcher.probe_every_s=1", "hydra.launcher.live=false",
        f"hydra.sweep.dir={sweep_dir}", *args,
    ]  # fmt: skip


@pytest.mark.slurm
def test_capacity_is_counted_in_gpus_per_job(tmp_path, slurm_testbed):
    tb = slurm_testbed
    # 3 of one node's 4 GPUs taken: 2-GPU jobs fit 0 + 2 times on the two GPU nodes.
    holder = slurm(
        tb,
        "alpha",
        "sbatch",
        "--parsable",
        "-p",
        tb.gpu_partition,
        "-N1",
        "--gres=gpu:3",
        "--output=/dev/null",
        "--wrap",
        "sleep 600",
    ).strip()
    try:
        wait_for(lambda: slurm(tb, "alpha", "squeue", "-h", "-j", holder, "-o", "%T").strip()
                 == "RUNNING", 30)  # fmt: skip
        sweep_dir = tmp_path / "sweep"
        result = subprocess.run(
            app_sweep_cmd(tb, sweep_dir, "value=1,2,3", "sleep_s=4",
                          f"hydra.launcher.clusters=[{tb.gpu_cluster}]",
                          "hydra.launcher.gpus_per_node=2", "hydra.launcher.when_busy=wait"),
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        slurm(tb, "alpha", "scancel", holder)
    assert result.returncode == 0, result.stderr[-3000:]
    records = journal_records(sweep_dir)
    submitted = [r for r in records if r["kind"] == "submitted"]
    assert [sorted(map(int, r["job_ids"])) for r in submitted] == [[0, 1], [2]]
    assert all(r["tasks"] == 2 for r in submitted)  # one task per GPU
    # The third waited here until a job's GPUs came free (each job sleeps 4 s).
    assert submitted[1]["t"] - submitted[0]["t"] >= 3
    assert sorted(r["value"] for r in records if r["kind"] == "result") == [102, 202, 302]


@pytest.mark.slurm
def test_a_job_pending_too_long_moves_to_a_cluster_that_frees_up(tmp_path, slurm_testbed):
    tb = slurm_testbed
    holders: dict[str, list[str]] = {"alpha": [], "beta": []}
    sweep_dir = tmp_path / "sweep"
    proc = None
    try:
        for cluster in ("alpha", "beta"):
            holders[cluster] += [hold_node(tb, cluster), hold_node(tb, cluster)]
        proc = subprocess.Popen(
            app_sweep_cmd(tb, sweep_dir, "value=7", "hydra.launcher.clusters=[alpha,beta]",
                          one_job_per_node(tb), "hydra.launcher.max_pending_s=4"),
            cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        # No room anywhere: it queues on alpha (the first cluster). Then beta frees up.
        wait_for(lambda: any(r.get("state") == "PENDING" or r["kind"] == "submitted"
                             for r in journal_records(sweep_dir)), 60)  # fmt: skip
        slurm(tb, "beta", "scancel", *holders["beta"])
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc is not None:
            proc.kill()
        for cluster, ids in holders.items():
            if ids:
                slurm(tb, cluster, "scancel", *ids, check=False)
    assert proc.returncode == 0, output[-3000:]
    records = journal_records(sweep_dir)
    (moved,) = [r for r in records if r["kind"] == "moved"]
    assert (moved["cluster"], moved["to"]) == ("alpha", "beta")
    submitted = [r for r in records if r["kind"] == "submitted"]
    assert [r["cluster"] for r in submitted] == ["alpha", "beta"]
    (result,) = [r for r in records if r["kind"] == "result"]
    assert (result["status"], result["value"]) == ("COMPLETED", 701)
    header = records[0]
    alpha_jobs = sacct_jobs(tb, "alpha", f"rank_app.{header['id']}.", at_least=1)
    assert list(alpha_jobs.values()) == ["CANCELLED"]  # cancelled where it waited, run once
