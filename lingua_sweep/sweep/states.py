"""Job states, ours and Slurm's: the one list of each, and what each Slurm end means.

Ours: QUEUED (not on a cluster yet), SUBMITTING (an sbatch may be under way: an intent whose
ids are not known yet), then Slurm's own states while it runs, then one of FINAL.
"""

QUEUED = "QUEUED"
SUBMITTING = "SUBMITTING"
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "PRUNED")

# What squeue is asked about: jobs still to run or running. A final state comes from sacct (the
# accounting record, with the exit code) whatever squeue still remembers.
SLURM_ACTIVE = (
    "PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
)  # fmt: skip
# Slurm states after which a job will not run again (REQUEUED, SUSPENDED etc. are not among
# them: it comes back as the same id). PREEMPTED is: a job preempted and requeued is PENDING
# again, one that stays PREEMPTED was cancelled by the preemption and must be submitted again.
SLURM_ENDED = (
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED",
)  # fmt: skip
WHY_FAILED = {
    "TIMEOUT": "time limit reached (raise hydra.launcher.timeout_min)",
    "OUT_OF_MEMORY": "out of memory (raise hydra.launcher.mem_gb)",
    "NODE_FAIL": "node failure",
    "BOOT_FAIL": "node failed to boot",
    "DEADLINE": "deadline reached",
    "PREEMPTED": "preempted",
}
# "Not started yet", for moving a job and for counting a cluster's queue.
WAITING = ("PENDING", "CONFIGURING", "UNKNOWN", SUBMITTING)
# Our final state for each Slurm end: what `lingua-sweep check` holds the journal to.
OUR_END = {
    "COMPLETED": "COMPLETED", "CANCELLED": "CANCELLED",
    **{s: "FAILED" for s in SLURM_ENDED if s not in ("COMPLETED", "CANCELLED")},
}  # fmt: skip
# Ends that say the job's code ran (to completion or into an error): two for one job is a rerun.
SLURM_RAN = ("COMPLETED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def agrees(ours: str, slurm: str) -> bool:
    """Whether our final state is what Slurm's end state says (a pruned job was cancelled; a
    preempted one that was never requeued failed)."""
    if ours == "PRUNED":
        return slurm == "CANCELLED"
    return OUR_END.get(slurm, "FAILED" if slurm == "PREEMPTED" else None) == ours


# Ends that say nothing about the job itself (its node or its partition's owner took it away):
# the job is submitted again, in its own dir, so it resumes from its last checkpoint.
RESUBMIT_ENDS = ("PREEMPTED", "NODE_FAIL", "BOOT_FAIL")
# A requeued job that Slurm holds (its launch failed, or an admin held it) never starts alone.
HELD = ("REQUEUE_HOLD",)
# (Not an admin's or the user's own hold: those are someone's decision.)
HELD_REASONS = ("launch failed requeued held",)

# squeue's pending reasons, in words; those under NOT_SOON mean the job will not start while
# things stay as they are (a limit, a partition rule, nodes gone), not merely "wait your turn".
PENDING_WORDS = {
    "Priority": "waiting behind higher-priority jobs",
    "Resources": "waiting for free nodes",
    "BeginTime": "held until its begin time (Slurm delays a requeued job)",
    "Dependency": "waiting for a dependency",
    "QOSMaxJobsPerUserLimit": "QOS limit: running jobs per user",
    "QOSMaxSubmitJobPerUserLimit": "QOS limit: submitted jobs per user",
    "QOSMaxGRESPerUser": "QOS limit: GPUs per user",
    "QOSMaxTRESPerUser": "QOS limit: resources per user",
    "QOSMaxCpuPerUserLimit": "QOS limit: CPUs per user",
    "QOSGrpGRES": "QOS group limit: GPUs",
    "QOSGrpCpuLimit": "QOS group limit: CPUs",
    "QOSGrpJobsLimit": "QOS group limit: running jobs",
    "AssocGrpGRES": "account limit: GPUs",
    "AssocGrpCpuLimit": "account limit: CPUs",
    "AssocGrpJobsLimit": "account limit: running jobs",
    "AssocMaxJobsLimit": "account limit: running jobs per user",
    "AssocGrpSubmitJobsLimit": "account limit: submitted jobs",
    "ReqNodeNotAvail": "its nodes are unavailable (down, drained or reserved)",
    "PartitionTimeLimit": "its time limit is over the partition's",
    "PartitionNodeLimit": "its node count is over the partition's",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition is inactive",
    "NodeDown": "a node it needs is down",
    "JobHeldAdmin": "held by an administrator",
    "JobHeldUser": "held (scontrol release to let it run)",
    "launch failed requeued held": "its launch failed; Slurm holds it",
    "InvalidQOS": "its QOS is not allowed",
}
NOT_SOON = tuple(
    r for r in PENDING_WORDS if r not in ("Priority", "Resources", "BeginTime", "Dependency")
)


# Where Slurm's start for a pending job is a set time (a reservation's end, a begin time), not
# a guess that every running job runs to its limit: its estimate holds as it is.
SET_START = ("ReqNodeNotAvail", "BeginTime", "Reservation")


def reason_code(reason: str | None) -> str:
    """The reason without Slurm's details ("ReqNodeNotAvail, Reserved for maintenance" ->
    "ReqNodeNotAvail")."""
    return (reason or "").split(",")[0].strip()


def pending_words(reason: str | None) -> str:
    """A pending reason for a person ("QOS limit: running jobs per user (QOSMax...)")."""
    if not reason:
        return ""
    code = reason_code(reason)
    words = PENDING_WORDS.get(code) or (
        "a limit of its QOS" if code.startswith("QOS")
        else "a limit of its account" if code.startswith("Assoc") else None
    )  # fmt: skip
    return f"{words} ({reason})" if words else reason


def not_soon(reason: str | None) -> bool:
    """Whether a pending reason means the job waits for something other than its turn."""
    code = reason_code(reason)
    return bool(code) and (code in NOT_SOON or code.startswith(("QOS", "Assoc")))


def set_start(reason: str | None) -> bool:
    """Whether Slurm's start for a job pending for this reason is a set time."""
    return reason_code(reason) in SET_START


def first_in_line(reason: str | None) -> bool:
    """Whether a job pending for this reason is the first in its queue: Slurm gives the next
    nodes that fit it to it."""
    return reason_code(reason) == "Resources"
