"""Time-to-result placement: the rule (earliest predicted finish, priority on ties, moves only
for a clear gain), its inputs (run times from the GPU table and from what the sweep saw, Slurm's
estimates corrected by how late they were) and, on simulated clusters, the launcher using it."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lingua_sweep.config import ClusterConfig
from lingua_sweep.sweep import forecast, predictions
from lingua_sweep.sweep import placement as pl
from lingua_sweep.sweep.journal import JobEntry, Journal, replay
from lingua_sweep.sweep.simulator import SimCluster, SimJob, SimSpec

REPO = Path(__file__).resolve().parents[1]


def outlook(name, *, room=0, start=None, run=None, frees=(), pending=(), headroom=None,
            capacity=1):  # fmt: skip
    return pl.Outlook(name=name, room=room, next_start_s=start, run_s=run, frees_s=list(frees),
                      pending_s=list(pending), headroom=headroom, capacity=capacity)  # fmt: skip


def test_a_job_goes_where_it_finishes_first_not_where_it_starts_first():
    plan = pl.Plan([
        outlook("research-secure", start=600, run=700),  # busy: starts in 10 min
        outlook("sphinx", room=1, run=1050),  # free now, A100s: 1.5x slower
        outlook("miso", start=100, run=580),  # a short wait, H200s
    ])  # fmt: skip
    choice = plan.best()
    assert choice.cluster == "miso" and (choice.start_s, choice.finish_s) == (100, 680)
    assert choice.alternatives == {"research-secure": 1300, "sphinx": 1050}


def test_alike_finishes_go_to_the_preferred_cluster():
    plan = pl.Plan([outlook("first", room=1, run=700), outlook("second", room=1, run=680)])
    assert plan.best().cluster == "first"  # 3% apart: the team's priority decides
    plan = pl.Plan([outlook("first", room=1, run=700), outlook("second", room=1, run=600)])
    assert plan.best().cluster == "second"


def test_placing_many_jobs_uses_each_slot_once():
    # `a` has a free node now; `b` is full, Slurm says one more job starts in 50 s, and its one
    # node turns over every run time.
    plan = pl.Plan([outlook("a", room=1, run=100), outlook("b", start=50, run=100)], n_jobs=4)
    choices = pl.place(plan, [None] * 4)
    assert [(c.cluster, c.start_s, c.finish_s) for c in choices] == [
        ("a", 0, 100), ("b", 50, 150), ("a", 100, 200), ("b", 150, 250),
    ]  # fmt: skip


def test_beyond_free_nodes_a_cluster_turns_over_and_those_jobs_wait_here():
    # `a` has 2 free nodes of 4, a job runs 400 s: one more frees every 100 s. Those slots are
    # a guess, not a queue place: the jobs wait here (own turn) and are placed again later.
    # `b` is full and Slurm says 250 s.
    plan = pl.Plan([outlook("a", room=2, run=400, capacity=4),
                    outlook("b", start=250, run=400)], n_jobs=5)  # fmt: skip
    choices = pl.place(plan, [None] * 5)
    assert [(c.cluster, c.start_s, c.own_turn) for c in choices] == [
        ("a", 0, False), ("a", 0, False), ("a", 100, True), ("a", 200, True), ("b", 250, False),
    ]  # fmt: skip


def test_our_own_jobs_ends_are_slots_and_nothing_known_is_no_choice():
    plan = pl.Plan([outlook("a", run=100, frees=[30, 80], headroom=0)])
    assert [c.start_s for c in pl.place(plan, [None] * 3)] == [30, 80, 130]
    empty = pl.Plan([outlook("a", run=100)])  # no room, no estimate, none of ours there
    assert empty.best().cluster is None


def test_a_pending_job_moves_only_for_a_clear_gain():
    plan = pl.Plan([outlook("b", room=1, run=700)])
    assert pl.better_elsewhere(800, plan, ["b"], min_gain_s=60) is None  # 12% sooner: stays
    assert pl.better_elsewhere(1000, plan, ["b"], min_gain_s=60).cluster == "b"  # 30%
    assert pl.better_elsewhere(1000, plan, ["b"], min_gain_s=400) is None  # below the floor


def test_run_times_come_from_the_gpu_table_then_from_what_the_sweep_saw():
    h100 = ClusterConfig(name="h", gpu_type="H100", data_root="/d", output_root="/o")
    a100 = ClusterConfig(name="a", gpu_type="A100", data_root="/d", output_root="/o")
    cpu = ClusterConfig(name="c", data_root="/d", output_root="/o")
    table = {c.name: pl.table_flops(c) for c in (h100, a100, cpu)}
    assert table["c"] is None and table["h"] / table["a"] == pytest.approx(1.5, rel=0.02)
    size, in_flops = pl.job_size(140e12 * 700, None)  # the default preset's 4,000 steps
    seen = pl.Observed()
    assert pl.run_seconds(size, in_flops, "h", seen, table) == pytest.approx(700)
    assert pl.run_seconds(size, in_flops, "c", seen, table) is None
    # The sweep's jobs ran twice as slow as the table on the H100s: the A100s are judged so too.
    seen.add_run("h", size, 1400)
    assert pl.run_seconds(size, in_flops, "h", seen, table) == pytest.approx(1400)
    assert pl.run_seconds(size, in_flops, "a", seen, table) == pytest.approx(2100, rel=0.02)
    # An app that is not the trainer: its H100 seconds, or nothing until a job has run.
    assert pl.job_size(None, 60.0) == (60.0 * 140e12, True)
    unit, in_flops = pl.job_size(None, None)
    assert pl.run_seconds(unit, in_flops, "h", pl.Observed(), table) is None


def test_slurm_estimates_are_corrected_by_how_late_they_were_after_three_starts():
    seen = pl.Observed()
    assert seen.correction("a") == 1.0  # nothing seen: Slurm's word as it is
    seen.add_start("a", asked_at=0, slurm_start=1000, started=800)
    seen.add_start("a", asked_at=0, slurm_start=500, started=450)
    assert seen.correction("a") == 1.0  # two are not enough
    seen.add_start("a", asked_at=100, slurm_start=1100, started=400)
    assert seen.correction("a") == pytest.approx(0.8)  # median of 0.8, 0.9, 0.3
    seen.add_start("a", asked_at=0, slurm_start=0.5, started=300)  # "now" says nothing
    assert seen.correction("a") == pytest.approx(0.8)
    # A cluster with too few of its own starts takes the lateness seen on the others.
    seen.add_start("b", asked_at=0, slurm_start=1000, started=100)
    assert seen.correction("b") == pytest.approx(0.55)  # median of 0.8, 0.9, 0.3, 0.1


def test_the_jobs_still_waiting_count_in_slurms_lateness():
    # Four starts were early; the one still waiting has already waited 0.3 of Slurm's estimate.
    seen = pl.Observed()
    for asked, estimate, started in [
        (0, 1000, 100),
        (0, 1000, 200),
        (0, 1000, 400),
        (0, 1000, 500),
    ]:
        seen.add_start("a", asked_at=asked, slurm_start=estimate, started=started)
    assert seen.correction("a") == pytest.approx(0.3)  # the starts alone: median of four
    seen.waiting = {"a": [0.3]}
    assert seen.correction("a") == pytest.approx(0.4)  # the late one weighs in (Kaplan-Meier)
    # A sweep learnt 0.05 from its first starts while its next jobs waited far longer: more
    # than half are beyond every start seen, so the lateness is at least the largest wait.
    early = pl.Observed(bias={"a": [0.05, 0.06, 0.07]}, waiting={"a": [0.3, 0.3, 0.3, 0.3]})
    assert early.correction("a") == pytest.approx(0.3)
    assert pl.censored_median([0.1, 0.2, 0.4, 0.5], []) == pytest.approx(0.3)  # as statistics'


def test_a_job_that_waited_long_expects_what_those_that_waited_as_long_saw():
    seen = pl.Observed(bias={"a": [0.1, 0.2, 0.4, 0.8, 1.6]})
    assert seen.correction("a") == pytest.approx(0.4)
    assert seen.correction("a", waited=0.3) == pytest.approx(0.8)  # of 0.4, 0.8, 1.6
    # Longer than any start seen: as long again (Lindy), never "about to start" forever.
    assert seen.correction("a", waited=2.0) == pytest.approx(4.0)
    assert pl.Observed().correction("a", waited=0.2) == 1.0  # nothing seen: Slurm's word
    assert pl.Observed().correction("a", waited=1.5) == pytest.approx(3.0)  # until it is late


def test_a_job_waits_here_for_its_turn_behind_ours_only_until_that_turn_passes():
    params = SimpleNamespace(detach=False, probe_every_s=30.0)
    f = forecast.Forecaster(SimpleNamespace(p=params))
    job = JobEntry(index=3, overrides=[], config_hash="x")
    turn = pl.Choice("a", start_s=100.0, finish_s=300.0, alternatives={}, own_turn=True)
    assert f.holds(job, turn, now=0.0)
    assert f.holds(job, turn, now=120.0)  # its turn (at 100) may be a poll late
    # Ours queued there took that turn; a later promise does not hold it again: it queues.
    later = pl.Choice("a", start_s=500.0, finish_s=700.0, alternatives={}, own_turn=True)
    assert not f.holds(job, later, now=131.0)
    params.detach = True  # a detached launcher leaves nothing waiting here
    assert not f.holds(JobEntry(index=4, overrides=[], config_hash="y"), turn, now=0.0)


def test_before_any_start_slurms_estimates_are_as_late_as_others_jobs_end_early():
    seen = pl.Observed(prior={"a": 0.3})  # others' jobs there used 30% of their limits
    assert seen.correction("a") == pytest.approx(0.3)
    assert seen.correction("b") == 1.0  # no history there: Slurm's word
    assert seen.correction("a", waited=0.5) == pytest.approx(1.0)  # later: as long again
    seen.bias = {"b": [0.1, 0.1, 0.1]}  # starts this sweep saw (anywhere) outrank it
    assert seen.correction("a") == pytest.approx(0.1)


def test_a_hung_sacct_holds_the_first_placement_only_to_the_probes_timeout():
    f = forecast.Forecaster(SimpleNamespace())
    answered = threading.Event()

    class Login:  # Slurm answers at once; sacct over two days of a busy cluster hangs
        def estimate_start(self, params):
            return time.time() + 1000

        def others_time_used(self, partition):
            answered.wait(30)
            return 0.2

    f.slurm.in_flight["a"] = threading.Event()
    link = SimpleNamespace(backend=Login())
    threading.Thread(target=f.slurm._estimate, args=("a", link, {"partition": "batch"}),
                     daemon=True).start()  # fmt: skip
    began = time.monotonic()
    f.slurm.await_first(["a"], timeout_s=0.5)
    assert 0.4 <= time.monotonic() - began < 3
    assert f.slurm.estimates["a"][0] is not None and not f.observed.prior  # Slurm's word, as it is
    answered.set()
    deadline = time.monotonic() + 10
    while "a" in f.slurm.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert f.observed.prior == {"a": 0.2}
    f.slurm.in_flight["a"] = threading.Event()  # a later estimate in flight: no wait for it
    began = time.monotonic()
    f.slurm.await_first(["a"], timeout_s=5)
    assert time.monotonic() - began < 0.5


def test_a_hung_test_only_holds_one_placement_not_every_one():
    """A login node that hangs `sbatch --test-only` costs the first placement the probe's
    timeout, then nothing (alpha's results were journaled 33 s late while beta hung)."""
    f = forecast.Forecaster(SimpleNamespace())
    released = threading.Event()
    link = SimpleNamespace(
        backend=SimpleNamespace(estimate_start=lambda params: released.wait(30) and None),
        quiet_since=lambda t: True,
    )
    f.slurm.in_flight["b"] = threading.Event()
    threading.Thread(target=f.slurm._estimate, args=("b", link, {}, 2), daemon=True).start()
    for wait in (0.5, 0.0):
        began = time.monotonic()
        f.slurm.await_first(["b"], timeout_s=0.5)
        assert wait - 0.1 <= time.monotonic() - began < wait + 0.3
    released.set()


def test_room_is_held_only_on_an_answer_no_sbatch_of_ours_overlapped():
    """sinfo shows room and Slurm says a job starts in an hour: the room is held (a
    reservation). The same answer while an sbatch of ours lands there says only that our job
    took the room: nothing is learnt. "Now" with room frees it again."""
    from lingua_sweep.sweep.link import Link

    later = [time.time() + 3600]
    link = Link(
        config=SimpleNamespace(name="a"),
        backend=SimpleNamespace(
            estimate_start=lambda params: later[0], others_time_used=lambda partition: None
        ),
    )
    f = forecast.Forecaster(SimpleNamespace())

    def answer(room: int) -> None:
        f.slurm.in_flight["a"] = threading.Event()
        f.slurm._estimate("a", link, {}, room)

    link.sbatch(lambda: answer(2))  # our array lands while Slurm is asked
    assert f.slurm.usable({"a": 2}) == {"a": 2} and "a" not in f.slurm.estimates
    answer(2)
    assert f.slurm.usable({"a": 2}) == {"a": 0} and f.slurm.next_start("a") == later[0]
    later[0] = time.time()
    answer(2)
    assert f.slurm.usable({"a": 2}) == {"a": 2}
    answer(0)  # no room: an estimate for the next job beyond it
    assert f.slurm.estimates["a"][0] == later[0]


def test_a_job_held_by_a_reservation_starts_when_slurm_says_unscaled():
    """Slurm's lateness (others' jobs end before their limits) does not shorten a wait for a
    reservation's end: a job pending `ReqNodeNotAvail, Reserved for maintenance` keeps
    `squeue --start` as it is."""
    seen = SimpleNamespace(pending_seen={1: time.time()})  # pending since now
    f = forecast.Forecaster(SimpleNamespace(watcher=seen))
    f.observed.prior["a"] = 0.2  # others there used 20% of their limits
    f.slurm_start[1] = ("a", time.time() + 5000)
    job = JobEntry(index=1, overrides=[], config_hash="x", state="PENDING", cluster="a",
                   reason="ReqNodeNotAvail, Reserved for maintenance")  # fmt: skip
    assert f.pending_start(job) == f.slurm_start[1][1]


def test_the_simulators_history_is_its_other_users_share_of_their_limits():
    # Others' runs are exponential (mean 600 s), their limits 3x the mean: median ln 2 / 3.
    spec = SimSpec(nodes=8, gpus_per_node=8, background_load=0.6, background_duration_s=600.0,
                   warmup_s=36000.0, seed=3)  # fmt: skip
    sim = SimCluster("sim", spec)
    assert sim.others_time_used() == pytest.approx(0.231, abs=0.06)
    assert SimCluster("idle", SimSpec(nodes=1)).others_time_used() is None  # nobody else


def test_slurm_estimates_assume_every_job_runs_to_its_limit():
    sim = SimCluster("sim", SimSpec(nodes=1, gpus_per_node=8, speed=1.0))
    with sim.lock:
        busy = SimJob(id="1", name="other", user="other", gpus=8, cpus=1, nodes=1,
                      duration=5.0, submitted=0.0, time_limit=3600.0)  # fmt: skip
        sim.enqueue(busy)
        sim.advance()
    start = sim.estimate({"nodes": 1, "gpus_per_node": 8, "time": 10})
    assert start == pytest.approx(time.time() + 3600, abs=5)  # it ends in 5 s


def test_the_journal_keeps_each_prediction_and_the_one_a_placement_used():
    records = [
        {"kind": "job", "t": 0, "index": 0, "overrides": [], "config_hash": "h"},
        {"kind": "forecast", "t": 1, "indices": [0], "jobs": {"0": {
            "cluster": "a", "at": 1, "start": 50, "slurm_start": 90, "run_s": 100,
            "alt": {"b": 300}, "planned": True}}},
        {"kind": "forecast", "t": 2, "index": 0, "jobs": {"0": {
            "cluster": "a", "at": 2, "start": 40, "slurm_start": 70}}},
    ]  # fmt: skip
    job = replay(records).jobs[0]
    assert job.planned["start"] == 50 and job.forecast["start"] == 40
    # Slurm's own word for this job is its first squeue --start once queued, not a later one.
    assert job.planned["slurm_own"] == 70
    later = {"cluster": "a", "at": 3, "start": 30, "slurm_start": 60}
    again = replay([*records, {"kind": "forecast", "t": 3, "index": 0, "jobs": {"0": later}}])
    assert again.jobs[0].planned["slurm_own"] == 70
    moved = [*records, {"kind": "moved", "t": 3, "index": 0, "to": "b"}]
    assert replay(moved).jobs[0].planned is None  # a prediction for `a` says nothing of `b`


def test_prediction_errors_per_cluster_against_slurms_own():
    def ran(cluster, started, ended, planned):
        return JobEntry(index=0, overrides=[], config_hash="h", state="COMPLETED",
                        cluster=cluster, started_at=started, ended_at=ended,
                        planned=planned)  # fmt: skip

    jobs = [
        ran("a", 100, 200, {"cluster": "a", "start": 110, "slurm_start": 400, "run_s": 90}),
        ran("a", 300, 400, {"cluster": "a", "start": 280, "slurm_start": 700, "run_s": 100}),
        ran("b", 0, 50, {"cluster": "a", "start": 0, "run_s": 10}),  # moved: not scored
    ]
    assert predictions.prediction_errors(jobs) == {
        "a": {"jobs": 2, "start_error_s": 15, "slurm_error_s": 350, "run_error_s": 5}
    }
    # Where Slurm gave the queued job an estimate of its own, that is Slurm's word for it.
    jobs[1].planned["slurm_own"] = 340
    assert predictions.prediction_errors(jobs)["a"]["slurm_error_s"] == 170  # median of 300, 40


def write_clusters(conf: Path, root: Path, shapes: dict, reserved: str | None = None) -> None:
    """Simulated clusters: name -> (priority, FLOP/s, run time); `reserved` has a maintenance
    reservation on all its nodes from 60 s into the sweep, for a day."""
    (conf / "cluster").mkdir(parents=True, exist_ok=True)
    for name, (priority, flops, duration) in shapes.items():
        spec = {"nodes": 2, "gpus_per_node": 8, "duration_s": duration, "duration_sigma": 0.0,
                "speed": 100.0}  # fmt: skip
        if name == reserved:
            spec["reservations"] = [{"start_s": 60.0, "duration_s": 86400.0}]
        cluster = {"name": name, "gpus_per_node": 8, "priority": priority, "simulated": spec,
                   "model_flops_per_s": flops, "data_root": str(root),
                   "output_root": str(root)}  # fmt: skip
        (conf / "cluster" / f"{name}.yaml").write_text(yaml.safe_dump(cluster))


def run_rank_app(tmp_path: Path, *args: str) -> Path:
    """tests/apps/rank_app.py through the launcher on the clusters in tmp_path/conf (each job
    expected to take 1 s on an H100 node); its sweep dir."""
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_"))}
    out = subprocess.run([
        sys.executable, str(REPO / "tests" / "apps" / "rank_app.py"), "-m",
        "hydra/launcher=multicluster", "hydra.launcher.expected_run_s=1",
        "hydra.launcher.poll_interval_s=0.2", "hydra.launcher.live=false",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.sweep.dir={sweep}", *args,
    ], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep


@pytest.mark.parametrize("placement", ["time_to_result", "priority"])
def test_the_launcher_sends_a_job_where_it_finishes_first(tmp_path, placement):
    """Two free simulated clusters: the preferred one 3x slower. Time-to-result sends both
    jobs to the faster; `placement=priority` keeps the old rule (first with room)."""
    h100 = 140e12  # `expected_run_s` is measured on an H100
    write_clusters(tmp_path / "conf", tmp_path, {
        "slow": (1, h100 / 3, 300.0),  # 3 real seconds at the simulation's speed
        "fast": (2, h100, 100.0),
    })  # fmt: skip
    sweep = run_rank_app(tmp_path, "value=1,2", "hydra.launcher.clusters=[slow,fast]",
                         f"hydra.launcher.placement={placement}")  # fmt: skip
    jobs = Journal(sweep).replay().jobs.values()
    assert all(j.state == "COMPLETED" for j in jobs)
    if placement == "priority":
        assert {j.cluster for j in jobs} == {"slow"} and all(j.planned is None for j in jobs)
        return
    assert {j.cluster for j in jobs} == {"fast"}
    for j in jobs:  # the prediction it was placed on, with the alternative it beat
        assert j.planned["cluster"] == "fast" and j.planned["run_s"] == pytest.approx(1.0)
        assert j.planned["alt"]["slow"] - j.planned["at"] == pytest.approx(3.0, abs=0.2)
    cli = str(Path(sys.executable).with_name("lingua-sweep"))
    res = subprocess.run([cli, "results", str(sweep), "--format", "md"], capture_output=True,
                         text=True)  # fmt: skip
    assert "prediction error" in res.stdout and "| fast | 2 |" in res.stdout, res.stdout
    json.dumps([j.planned for j in jobs])  # journaled as plain JSON


@pytest.mark.parametrize("placement", ["time_to_result", "priority"])
def test_idle_nodes_held_for_a_reservation_are_no_room(tmp_path, placement):
    """The preferred, faster cluster's nodes are idle to sinfo, but a maintenance reservation
    begins within the jobs' time limit (as `sbatch --test-only` says): time-to-result sends the
    jobs to the slower one at once (the third queues there, and the 0.5 s safety net does not
    move it into the reservation either); the dispatcher sends two into the reservation and
    moves them on Slurm's reason (ReqNodeNotAvail), a scancel and a resubmission each."""
    h100 = 140e12
    write_clusters(tmp_path / "conf", tmp_path, {
        "fast": (1, h100, 100.0),  # 1 real second at the simulation's speed
        "slow": (2, h100 / 2, 200.0),
    }, reserved="fast")  # fmt: skip
    sweep = run_rank_app(tmp_path, "value=1,2,3", "hydra.launcher.clusters=[fast,slow]",
                         f"hydra.launcher.placement={placement}",
                         "hydra.launcher.probe_every_s=0.5",
                         "hydra.launcher.max_pending_s=0.5")  # fmt: skip
    jobs = Journal(sweep).replay().jobs.values()
    assert all(j.state == "COMPLETED" and j.cluster == "slow" for j in jobs)
    if placement == "priority":
        assert sorted(j.moves for j in jobs) == [0, 1, 1]
        return
    assert all(j.moves == 0 for j in jobs)
    for j in jobs:  # Slurm's word for the reserved cluster, as it is: the reservation's end
        assert j.planned["alt"]["fast"] - j.planned["at"] == pytest.approx(86460 / 100 + 1, abs=2)


def test_our_jobs_held_by_our_limit_wait_for_our_own_slots():
    # Two of ours run (ending in 100 and 300 s); two wait behind our limit, one with Slurm's
    # word (start at 50). The next new job there starts when the held one's slot frees.
    plan = pl.Plan([outlook("a", run=200, frees=[100, 300], pending=[None, 50], headroom=0)])
    assert plan.pending_starts["a"] == [100, 50]
    assert plan.best().start_s == 250  # 50 + 200: the slot Slurm's estimate opens, then ends


def test_under_our_limit_a_job_of_ours_pending_there_holds_the_slot_slurm_sees():
    # Limit 1, none running, ours pending with Slurm's word (60 s): a new job's turn is its
    # end, not Slurm's estimate for one more job (two were placed on one slot, one a cycle).
    plan = pl.Plan([outlook("a", run=100, start=50, headroom=1, pending=[60])])
    assert plan.best().start_s == 160


def test_a_job_past_its_predicted_run_time_ends_soon_not_now():
    assert pl.remaining_s(600, 100) == 500
    assert pl.remaining_s(600, 700) == pytest.approx(60)  # overran: soon, not a free node


def test_a_waiting_job_says_when_it_should_start_and_where_else_it_could_go():
    from lingua_sweep.sweep.monitor import waiting_words

    at = time.mktime((2026, 12, 2, 14, 0, 0, 0, 0, -1))
    job = JobEntry(index=0, overrides=[], config_hash="h", state="PENDING", cluster="a",
                   reason="Resources", forecast={"cluster": "a", "at": at, "start": at + 300,
                   "slurm_start": at + 900, "alt": {"b": at + 1500, "c": at + 1200}})  # fmt: skip
    assert waiting_words(job) == (
        "waiting for free nodes (Resources); starts ~14:05 (Slurm: 14:15); c would finish ~14:20"
    )


def test_with_no_run_time_known_each_free_slot_takes_one_job():
    plan = pl.Plan([outlook("a", room=1), outlook("b", room=1)])
    # the third: no slot anywhere, so the dispatcher queues it as before
    assert [c.cluster for c in pl.place(plan, [None] * 3)] == ["a", "b", None]


def test_under_a_limit_of_ours_slurms_word_opens_no_more_slots_than_the_limit_allows():
    # One more of ours may run on `a`, whose nodes are busy: Slurm's estimate opens one slot;
    # the next job there waits for that one's end, not for the next node to turn over.
    plan = pl.Plan([outlook("a", run=100, start=50, headroom=1, capacity=8)], n_jobs=3)
    assert [c.start_s for c in pl.place(plan, [None] * 3)] == [50, 150, 250]


def test_a_turn_behind_our_own_jobs_is_ours_to_take_later_not_a_queue_place():
    plan = pl.Plan([outlook("a", room=1, run=100, headroom=1),
                    outlook("b", run=100, start=500)], n_jobs=3)  # fmt: skip
    choices = pl.place(plan, [None] * 3)
    assert [(c.cluster, c.start_s, c.own_turn) for c in choices] == [
        ("a", 0, False), ("a", 100, True), ("a", 200, True),
    ]  # fmt: skip


def test_without_a_limit_of_ours_our_ends_go_to_the_queue_and_ours_follow_slurms_word():
    # A shared partition of 2 nodes, full: our job there ends in 100 s, but others wait first;
    # Slurm says a new job starts in 400 s, and a node turns over every 300 s (600 / 2).
    plan = pl.Plan([outlook("p", run=600, frees=[100], start=400, capacity=2)], n_jobs=3)
    assert [c.start_s for c in pl.place(plan, [None] * 3)] == [400, 700, 1000]


def test_the_first_job_in_line_takes_the_first_start_not_the_best_finish_forever():
    # `fast` frees one of our slots in 100 s (a 300 s finish); `slow` has a node now (a 400 s
    # finish). The first job's best slot is the wait; had it kept it, every later job would
    # pass it to the free node, cycle after cycle. The second waits instead.
    plan = pl.Plan([outlook("fast", run=200, frees=[100], headroom=0),
                    outlook("slow", room=1, run=400)], n_jobs=2)  # fmt: skip
    choices = pl.place(plan, [None, None])
    assert [(c.cluster, c.start_s) for c in choices] == [("slow", 0), ("fast", 100)]
    # Jobs with other choices (memory) keep their own.
    plan = pl.Plan([outlook("fast", run=200, frees=[100], headroom=0),
                    outlook("slow", room=1, run=400)], n_jobs=2)  # fmt: skip
    choices = pl.place(plan, [["fast"], None])
    assert [(c.cluster, c.start_s) for c in choices] == [("fast", 100), ("slow", 0)]


def test_a_job_is_never_placed_where_it_does_not_fit():
    plan = pl.Plan([outlook("small", room=1, run=100), outlook("big", room=1, run=200)])
    choices = pl.place(plan, [["big"], None])
    assert [c.cluster for c in choices] == ["big", "small"]


def trainer_sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The default preset through the launcher on two simulated clusters: `a100` (40 GB GPUs,
    preferred) and `h100` (80 GB)."""
    conf = tmp_path / "conf" / "cluster"
    conf.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data" / "fineweb_edu_10bt_shuffled"  # checked, never read
    data.mkdir(parents=True, exist_ok=True)
    for name in ("fineweb_edu_10bt.chunk.00.jsonl", "fineweb_edu_10bt.val.jsonl"):
        (data / name).write_text('{"text": "a simulated job reads nothing"}\n')
    for name, priority in (("a100", 1), ("h100", 2)):
        spec = {"nodes": 1, "gpus_per_node": 8, "duration_s": 100.0, "speed": 100.0}
        cluster = {"name": name, "gpus_per_node": 8, "gpu_type": name.upper(),
                   "priority": priority, "simulated": spec, "data_root": str(tmp_path / "data"),
                   "output_root": str(tmp_path)}  # fmt: skip
        (conf / f"{name}.yaml").write_text(yaml.safe_dump(cluster))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINGUA_"))}
    return subprocess.run([
        sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=multicluster",
        "hydra.launcher.clusters=[a100,h100]", "hydra.launcher.poll_interval_s=0.2",
        "hydra.launcher.live=false", "logging.wandb=null",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides,
    ], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)  # fmt: skip


def test_the_launcher_sends_each_job_only_where_its_memory_fits(tmp_path):
    # Without the A100 rule the default preset needs ~48 GB per GPU: only the H100s fit it.
    out = trainer_sweep(tmp_path, "distributed.a100_halve_batch=false,true")
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = {j.index: j.cluster for j in Journal(tmp_path / "sweep").replay().jobs.values()}
    assert jobs == {0: "h100", 1: "a100"}


def test_a_job_too_big_for_every_cluster_is_one_line_before_anything_is_submitted(tmp_path):
    out = trainer_sweep(tmp_path, "data.batch_size=64,8")
    assert out.returncode == 2, out.stderr[-3000:]
    [line] = out.stderr.strip().splitlines()
    assert "job #0" in line and "data.batch_size" in line and "GB" in line, line
    assert not (tmp_path / "sweep").exists()


def test_a_limit_full_of_the_users_jobs_is_a_turn_by_their_time_limits_not_unknown():
    """alpha's MaxJobsPerUser is filled by the user's other job (ends by its limit in an hour)
    and by ours (no run time known: by its own limit); beta's queue is a year long (jobs with
    no limit). The job waits for its turn on alpha, which comes by the earlier of those limits;
    it once went to beta's queue, alpha's turn being unknown."""
    from lingua_sweep.sweep.limits import Headroom
    from lingua_sweep.sweep.params import LauncherParams

    now = time.time()
    clusters = {n: ClusterConfig(name=n, gpu_type="H100", data_root="/d", output_root="/o")
                for n in ("alpha", "beta")}  # fmt: skip
    links = {
        "alpha": SimpleNamespace(config=clusters["alpha"], status=None,
                                 usage={"running": 1, "ends": [now + 3600]}),
        "beta": SimpleNamespace(config=clusters["beta"], status=None, usage={}),
    }  # fmt: skip
    ours = JobEntry(index=0, overrides=[], config_hash="a", state="RUNNING", cluster="alpha",
                    started_at=now - 60)  # fmt: skip
    controller = SimpleNamespace(
        p=LauncherParams(timeout_min=240), links=links, configs={},
        dispatcher=SimpleNamespace(headroom=lambda n: Headroom(start=0 if n == "alpha" else None,
                                                               submit=None)),
        open_jobs=lambda: [ours], jobs=lambda state: [], watcher=SimpleNamespace(pending_seen={}),
    )  # fmt: skip
    f = forecast.Forecaster(controller)
    f.slurm.estimates["beta"] = (now + 365 * 86400, now)
    alpha = f.outlook("alpha", 0, 1, now)
    assert alpha.frees_s == pytest.approx([240 * 60 - 60, 3600], abs=1)
    plan = pl.Plan([alpha, f.outlook("beta", 0, 1, now)])
    choice = plan.best()
    assert choice.cluster == "alpha" and choice.own_turn
    assert choice.start_s == pytest.approx(3600, abs=1)


def test_a_job_waiting_behind_ours_that_just_ended_gets_a_probe_to_start_before_a_move():
    """Our job on `a` ended a second ago; the job pending behind it there still carries Slurm's
    old estimate (hours). Slurm starts it at its next pass: it is not moved (it was, and killed
    as it started on `a`), so nothing is even asked."""
    from lingua_sweep.sweep.params import LauncherParams

    now = time.time()
    done = JobEntry(index=0, overrides=[], config_hash="a", state="COMPLETED", cluster="a",
                    started_at=now - 20, ended_at=now - 1)  # fmt: skip
    waiting = JobEntry(index=1, overrides=[], config_hash="b", state="PENDING", cluster="a",
                       submitted_at=now - 20)  # fmt: skip
    controller = SimpleNamespace(
        p=LauncherParams(probe_every_s=30), configs={},
        state=SimpleNamespace(jobs={0: done, 1: waiting},
                              by_state={"COMPLETED": {0}, "PENDING": {1}}),
        jobs=lambda state: [waiting] if state == "PENDING" else [],
        watcher=SimpleNamespace(pending_seen={1: now - 19}),
    )  # fmt: skip
    f = forecast.Forecaster(controller)
    assert f.moves({"b": 1}, ["a", "b"]) == []
    assert f.last_end == {"a": now - 1}


def test_the_job_first_in_line_starts_as_our_running_job_ends_and_the_safety_net_leaves_it():
    """No limit of ours on `a`: Slurm's word for the job first in line (3 hours) counts our
    running job there to its 4-hour limit; that job ends in 100 s and its node is the first in
    line's. The last job of a sweep was moved by the safety net from there to a 1.5x slower
    cluster on that word, and finished last. A job behind others' (`Priority`) keeps Slurm's
    word, and the safety net may move it."""
    from lingua_sweep.sweep.limits import Headroom
    from lingua_sweep.sweep.params import LauncherParams

    now = time.time()
    clusters = {n: ClusterConfig(name=n, gpu_type=gpu, data_root="/d", output_root="/o")
                for n, gpu in (("a", "H100"), ("b", "A100"))}  # fmt: skip
    links = {n: SimpleNamespace(config=c, status=None, usage={}) for n, c in clusters.items()}
    running = JobEntry(index=0, overrides=[], config_hash="a", state="RUNNING", cluster="a",
                       started_at=now - 600)  # fmt: skip
    first = JobEntry(index=1, overrides=[], config_hash="b", state="PENDING", cluster="a",
                     submitted_at=now - 900, reason="Resources")  # fmt: skip
    behind = JobEntry(index=2, overrides=[], config_hash="c", state="PENDING", cluster="a",
                      submitted_at=now - 900, reason="Priority")  # fmt: skip
    controller = SimpleNamespace(
        p=LauncherParams(expected_run_s=700, probe_every_s=30), links=links, configs={},
        dispatcher=SimpleNamespace(headroom=lambda n: Headroom(start=None, submit=None)),
        open_jobs=lambda: [running, first, behind], jobs=lambda state: [],
        watcher=SimpleNamespace(pending_seen={1: now - 5, 2: now - 5}),
    )  # fmt: skip
    f = forecast.Forecaster(controller)
    for job in (first, behind):
        f.slurm_start[job.index] = ("a", now + 3 * 3600)
    a = f.outlook("a", 0, 1, now)
    assert a.frees_s == pytest.approx([100], abs=1)
    assert a.pending_s == pytest.approx([100, 3 * 3600], abs=1)
    # On `b` (A100s) the job would finish in 1,050 s; here in ~800 s.
    assert f.sooner_here(first, "b", {"b": 1})
    assert not f.sooner_here(behind, "b", {"b": 1})
    first.reason = "Priority"  # behind another user's job: Slurm's word stands
    assert f.outlook("a", 0, 1, now).pending_s[0] == pytest.approx(3 * 3600, abs=1)


def test_a_turn_of_ours_that_a_reservation_covers_opens_when_the_reservation_ends():
    """Our limit on `a` is full; our job there ends in 900 s, but a maintenance keeps a job of
    ours off every node from 600 s (its start less our time limit) for two hours. The turn is
    at the maintenance's end, so the job goes to `b` (start 1,000 s, 1,000 s to run)."""
    b = outlook("b", start=1000, run=1000)
    a = outlook("a", run=700, frees=[900], headroom=0)
    assert pl.Plan([a, b]).best().cluster == "a"  # 1,600 s
    a.blackout = (600.0, 7800.0)
    choice = pl.Plan([a, b]).best()
    assert choice.cluster == "b" and choice.alternatives == {"a": 8500.0}
    # Our job pending there under our limit holds the turn after it, which also waits it out
    a.pending_s, a.frees_s = [300.0], []
    assert pl.Plan([a, b]).slots["a"] == [(7800.0, True)]


def test_a_turn_of_ours_on_a_full_cluster_is_a_queue_place_to_take_not_a_turn_to_wait_for():
    """Our limit on `a` is full; our job there ends in 300 s. With idle nodes there (our limit
    binds), its slot passes to our next job: that job waits here and is placed afresh then.
    With none, the node goes to the first in the queue: a job held here for that turn lost it
    to another user's job queued there, so it queues there now."""
    a = outlook("a", run=700, frees=[300], headroom=0)
    b = outlook("b", start=2000, run=700)
    choice = pl.Plan([a, b]).best()
    assert choice.cluster == "a" and choice.own_turn
    a.full = True
    choice = pl.Plan([a, b]).best()
    assert choice.cluster == "a" and choice.start_s == 300 and not choice.own_turn
    plan = pl.Plan([a, b])
    plan.take("a")  # and so does the turn after it
    assert plan.slots["a"] == [(1000.0, False)]


def test_a_cluster_is_full_where_sinfo_shows_no_idle_node_a_job_of_ours_could_take():
    from lingua_sweep.clusters import ClusterStatus, NodeRoom
    from lingua_sweep.sweep.limits import Headroom
    from lingua_sweep.sweep.params import LauncherParams

    def full(*gpus_free: int) -> bool:
        nodes = [NodeRoom(name=f"n{k}", state="mixed", free_cpus=64, free_gpus=g)
                 for k, g in enumerate(gpus_free)]  # fmt: skip
        status = ClusterStatus(name="a", state="busy", idle_nodes=0, total_nodes=len(nodes),
                               reason=None, elapsed_s=0.0, nodes=nodes)  # fmt: skip
        config = ClusterConfig(name="a", gpu_type="H100", gpus_per_node=8, data_root="/d",
                               output_root="/o")  # fmt: skip
        controller = SimpleNamespace(
            p=LauncherParams(expected_run_s=700), configs={},
            links={"a": SimpleNamespace(config=config, status=status, usage={})},
            dispatcher=SimpleNamespace(headroom=lambda n: Headroom(start=0, submit=None)),
            open_jobs=lambda: [], jobs=lambda state: [], watcher=SimpleNamespace(pending_seen={}),
        )  # fmt: skip
        # room 0: our limit there is full, whatever sinfo shows
        return forecast.Forecaster(controller).outlook("a", 0, 1, time.time()).full

    assert full(0, 4)  # no node with a whole job's 8 GPUs free
    assert not full(0, 8)  # one: our limit binds, not the nodes


def test_a_job_slurm_stops_giving_a_start_forgets_the_one_it_had():
    """Held by our own limit, a pending job gets no `squeue --start` (N/A): its turn is one of
    our jobs' ends, not the estimate of hours it had before (on which the safety net moved a
    job whose turn came in 135 s to a slower cluster, and it finished last)."""
    now = time.time()
    job = JobEntry(index=3, overrides=[], config_hash="x", state="PENDING", cluster="a",
                   reason="Priority")  # fmt: skip
    recorded = []
    controller = SimpleNamespace(record=lambda kind, **fields: recorded.append(kind),
                                 watcher=SimpleNamespace(pending_seen={3: now}))  # fmt: skip
    f = forecast.Forecaster(controller)
    f.note_pending(job, now + 5 * 3600)
    assert f.pending_start(job) == pytest.approx(now + 5 * 3600, abs=1) and recorded
    job.reason = "QOSMaxJobsPerUserLimit"
    f.note_pending(job, None)
    assert f.pending_start(job) is None
