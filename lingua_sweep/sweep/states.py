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
# Slurm states after which a job will not run again. PREEMPTED, REQUEUED, SUSPENDED etc. are
# not among them: submitit requeues a preempted job, and it comes back as the same id.
SLURM_ENDED = (
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
    "DEADLINE",
)  # fmt: skip
WHY_FAILED = {
    "TIMEOUT": "time limit reached (raise hydra.launcher.timeout_min)",
    "OUT_OF_MEMORY": "out of memory (raise hydra.launcher.mem_gb)",
    "NODE_FAIL": "node failure",
    "BOOT_FAIL": "node failed to boot",
    "DEADLINE": "deadline reached",
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
