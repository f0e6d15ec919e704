"""The sweep controller: a sweep's jobs from composition to results, durable across launchers.

journal     the sweep's durable state (append-only JSONL): jobs, ids, states, results
compose     compose + validate each job's config, and the hash that pins it
remote      ssh/rsync through one multiplexed connection per login node
agent       what runs where a cluster's Slurm is: submit, query, read results, cancel
backends    one protocol for a cluster: in-process (local Slurm, `local`) or over ssh
dispatch    which queued job goes to which cluster now, and moving long-pending jobs
forecast    time-to-result: each cluster's outlook, placements and moves (rule in placement)
estimates   Slurm's word fetched in the background: --test-only, reservations, job history
controller  the loop tying journal, backends and dispatch together
monitor     the live view of a running sweep
clock       the controller's clock: the wall clock, or virtual time on simulated clusters
simulator   a simulated Slurm cluster behind the same protocol (bench/scale.py, placement.py)
finding     `lingua-sweep ls | logs`
"""
