"""The job as it runs on a node: the torch master's port every task of a job agrees on."""

from pathlib import Path

from lingua_sweep.sweep.job import MASTER_PORTS, master_port


def test_every_task_of_a_job_derives_the_same_port_and_jobs_differ():
    ports = {job: master_port(job, environ={}) for job in ("4812", "4812_0", "4812_1", "4813")}
    assert master_port("4812_1", environ={}) == ports["4812_1"]
    assert len(set(ports.values())) == len(ports)


def test_derived_ports_stay_out_of_the_kernels_ephemeral_range():
    # Outgoing connections take local ports from this range: a master port in it can be taken
    # by any connection on a busy node (the EADDRINUSE CI saw at port 43810).
    low, high = 32768, 60999
    range_file = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if range_file.exists():
        low, high = map(int, range_file.read_text().split())
    ports = {master_port(str(job), environ={}) for job in range(2000)}
    assert all(p in MASTER_PORTS and not low <= p <= high for p in ports)
    assert len(ports) > 1800  # spread over the range, not a few favourites


def test_a_port_slurm_reserved_for_the_step_comes_first():
    assert master_port("4812", environ={"SLURM_STEP_RESV_PORTS": "12000-12001"}) == 12000
    assert master_port("4812", environ={"SLURM_STEP_RESV_PORTS": "12005,12007"}) == 12005
