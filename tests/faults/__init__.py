"""Real fault injectors for the Slurm testbed; see faults/injectors.py."""

from faults.injectors import (
    COMMANDS,
    SYSTEM_PATH,
    Call,
    CommandFaults,
    conf_with_faults,
    exit_problems,
    full_disk,
    kill_control_master,
    restart_slurmctld,
    slurmctld_down,
    slurmdbd_down,
    ssh_hung,
    sshd_down,
)

__all__ = [
    "COMMANDS",
    "SYSTEM_PATH",
    "Call",
    "CommandFaults",
    "conf_with_faults",
    "exit_problems",
    "full_disk",
    "kill_control_master",
    "restart_slurmctld",
    "slurmctld_down",
    "slurmdbd_down",
    "ssh_hung",
    "sshd_down",
]
