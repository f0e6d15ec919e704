"""Slurm limits read from sacctmgr/scontrol text, usage from squeue, and sbatch refusals."""

from lingua_sweep.sweep.dispatch import assign
from lingua_sweep.sweep.limits import (
    Limits,
    Usage,
    classify_refusal,
    gres_gpus,
    headroom,
    parse_limits,
    parse_usage,
)
from lingua_sweep.sweep.slurm_queries import slurm_time
from lingua_sweep.sweep.states import not_soon, pending_words, set_start

# `sacctmgr -n -P show assoc where user=me format=Account,Partition,QOS,DefaultQOS,MaxJobs,...`
ASSOC = "research|||normal|||||\nresearch|debug|||2||||\nother||||||||\n"
ASSOC_LIMITED = "research||capped,normal|normal|8|20|||gres/gpu=16,cpu=256\n"
# `sacctmgr -n -P show qos format=Name,MaxJobsPU,MaxSubmitPU,MaxTRESPU,GrpJobs,GrpSubmit,GrpTRES`
QOS = "normal||||||\ncapped|1|2|gres/gpu=4|||\n"
CONFIG = "ClusterName             = alpha\nMaxArraySize            = 3\nMaxJobCount = 10000\n"


def test_the_qos_in_use_sets_the_limits_and_says_where_they_come_from():
    limits = parse_limits(ASSOC, QOS, CONFIG, qos="capped", account=None)
    assert (limits.max_jobs, limits.max_submit, limits.max_gpus) == (1, 2, 4)
    assert limits.max_array == 3
    assert limits.why["max_jobs"] == "QOS capped MaxJobsPerUser"
    assert limits.why["max_gpus"] == "QOS capped MaxTRESPerUser"


def test_the_default_qos_without_limits_and_a_partition_association_limit_nothing():
    limits = parse_limits(ASSOC, QOS, "", qos=None, account="research")
    assert limits == Limits()


def test_the_tightest_of_association_and_qos_wins():
    limits = parse_limits(ASSOC_LIMITED, QOS, CONFIG, qos="capped", account="research")
    assert (limits.max_jobs, limits.max_submit, limits.max_gpus) == (1, 2, 4)
    limits = parse_limits(ASSOC_LIMITED, QOS, CONFIG, qos=None, account="research")
    assert (limits.max_jobs, limits.max_submit, limits.max_gpus) == (8, 20, 16)
    assert limits.why["max_gpus"] == "association research GrpTRES"


def test_usage_leaves_out_the_sweeps_own_jobs_and_counts_gpus_per_node():
    out = (
        "101|RUNNING|None|train|2|gres:gpu:4|2026-12-02T10:00:00|2026-12-02T14:00:00\n"  # 2x4 GPUs
        "102_3|PENDING|Priority|train|1|gres/gpu:a100:2|N/A|N/A\n"
        "103|RUNNING|None|lingua-sweep-abc-5|1|gres:gpu:1||2026-12-02T11:00:00\n"  # ours
        "104|RUNNING|None|notebook|1|N/A|2026-12-02T10:00:00|Unknown\n"  # no limit
    )
    assert parse_usage(out, "lingua-sweep-abc-") == Usage(running=2, active=3, gpus=8)
    # when each of the user's other running jobs reaches its time limit
    usage = parse_usage(out, "lingua-sweep-abc-", slurm_time)
    assert usage.ends == [slurm_time("2026-12-02T14:00:00")]
    assert gres_gpus("N/A") == 0 and gres_gpus("gres:gpu:8") == 8


def test_headroom_counts_the_users_other_jobs_and_ours():
    limits = Limits(max_jobs=4, max_submit=6, max_gpus=8)
    usage = Usage(running=1, active=2, gpus=2)
    room = headroom(limits, usage, ours_running=1, ours_active=3, gpus_per_job=2)
    # jobs: 4 - 1 - 1 = 2; GPUs: (8 - 2 - 2) // 2 = 2; submit: 6 - 2 - 3 = 1
    assert (room.start, room.submit) == (2, 1)
    room = headroom(Limits(), usage, ours_running=5, ours_active=9, gpus_per_job=8)
    assert (room.start, room.submit) == (None, None)
    room = headroom(Limits(max_jobs=1), Usage(running=3), ours_running=0, ours_active=0,
                    gpus_per_job=0)  # fmt: skip
    assert room.start == 0  # never negative


def test_submit_caps_keep_jobs_here_instead_of_in_a_refusal_loop():
    targets = assign(5, {"a": 1, "b": 0}, ["a", "b"], queue_on="a", when_busy="queue",
                     caps={"a": 2, "b": None})  # fmt: skip
    assert targets == ["a", "a", None, None, None]
    targets = assign(3, {"a": 0, "b": 2}, ["a", "b"], queue_on="a", when_busy="queue",
                     caps={"a": 0, "b": None})  # fmt: skip
    assert targets == ["b", "b", None]


def test_sbatch_refusals_are_told_apart():
    submit_limit = (
        "sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission "
        "failed: Job violates accounting/QOS policy (job submit limit, user's size and/or time "
        "limits)\n"
    )
    kind, why = classify_refusal(submit_limit)
    assert kind == "transient" and why.startswith("QOSMaxSubmitJobPerUserLimit")
    wall = submit_limit.replace("QOSMaxSubmitJobPerUserLimit", "QOSMaxWallDurationPerJobLimit")
    assert classify_refusal(wall)[0] == "permanent"
    too_big = "sbatch: error: Batch job submission failed: Job array index too large"
    assert classify_refusal(too_big)[0] == "too_big"
    kind, why = classify_refusal("sbatch: error: Batch job submission failed: Invalid qos "
                                 "specification")  # fmt: skip
    assert (kind, why) == ("permanent", "Batch job submission failed: Invalid qos specification")
    busy = "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying"
    assert classify_refusal(busy)[0] == "transient"


def test_pending_reasons_in_words_and_which_ones_will_not_pass_by_waiting():
    assert pending_words("QOSMaxJobsPerUserLimit") == (
        "QOS limit: running jobs per user (QOSMaxJobsPerUserLimit)"
    )
    assert pending_words("QOSSomethingNew") == "a limit of its QOS (QOSSomethingNew)"
    assert pending_words(None) == ""
    assert not_soon("AssocGrpGRES") and not_soon("ReqNodeNotAvail")
    # squeue's words on the testbed's real Slurm for a job behind a maintenance reservation
    reserved = "ReqNodeNotAvail, Reserved for maintenance"
    assert not_soon(reserved) and pending_words(reserved) == (
        "its nodes are unavailable (down, drained or reserved) "
        "(ReqNodeNotAvail, Reserved for maintenance)"
    )
    assert set_start(reserved) and not set_start("Priority") and not set_start(None)
    assert not not_soon("Priority") and not not_soon("Resources") and not not_soon(None)
