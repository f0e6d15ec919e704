"""Named moments of the controller at which a fault campaign stops the launcher.

    LINGUA_SWEEP_FAULTPOINT=submit.landed:KILL python train.py -m ...

sends the launcher SIGKILL (or INT: a Ctrl-C) the first time it reaches that moment, so that
tests and `bench/faults.py` can interrupt it exactly between two steps (ids back from sbatch but
not yet journaled, a stop journaled but not yet sent to Slurm, ...) instead of hoping a timer
lands there. Unset, `hit` is one dict lookup. The moments are listed in POINTS; each is a place
where a crash used to lose or duplicate work.
"""

import os
import signal

ENV = "LINGUA_SWEEP_FAULTPOINT"
POINTS = (
    "submit.intent",  # the intent is journaled; sbatch has not started
    "submit.sbatch",  # the fenced sbatch was handed to the cluster's thread
    "submit.landed",  # sbatch answered with ids; the `submitted` record is not written yet
    "poll.final",  # a job's end was seen; its `result` is not written yet
    "stop.recorded",  # a cancel/prune/move is journaled; scancel has not been sent
    "cancel.recorded",  # the sweep's cancel is journaled; nothing is cancelled yet
    "fetch",  # a finished job's outputs are being brought home
    "study.asked",  # Optuna asked a trial; it has no sweep attribute and no job yet
    "study.told",  # a trial was told its end; the next one is not asked yet
)
_fired = False


def hit(point: str) -> None:
    global _fired
    spec = os.environ.get(ENV)
    if not spec or _fired:
        return
    name, _, sig = spec.partition(":")
    if name == point:
        _fired = True
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))
