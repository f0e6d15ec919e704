"""The Slurm questions the agent asks on a cluster: its jobs' states, a submission's ids by
name, the user's limits and usage. Plain parsing of squeue/sacct/sacctmgr/scontrol output."""

import getpass
import statistics
import time
from collections.abc import Iterable
from typing import Any

from lingua_sweep.sweep.limits import ASSOC_COLUMNS, QOS_COLUMNS, Limits, parse_limits, parse_usage
from lingua_sweep.sweep.states import SLURM_ACTIVE

# sbatch waits this long for slurmctld; a busy one can take minutes (the fence covers that).
SLURM_TIMEOUT_S = 60.0


def run(argv: list[str]) -> str:
    from lingua_sweep.sweep import remote

    return remote.run(argv, login=None, timeout=SLURM_TIMEOUT_S).stdout


def slurm_states(ids: list[str], prefix: str | None = None) -> tuple[dict, dict[str, str], dict]:
    """({id: {state, reason}}, {id: name of every active job named `prefix...`}, the user's
    usage apart from those) from one `squeue` of active jobs and, for the others, one `sacct`.

    A job sacct does not know yet (slurmdbd lags sbatch by a second or two) is UNKNOWN, which
    is not final: it is asked again at the next poll.
    """
    wanted = set(ids)
    found: dict[str, dict[str, str]] = {}
    named: dict[str, str] = {}
    if not ids and not prefix:
        return {}, named, {}
    out = _active_jobs()
    usage = parse_usage(out, prefix, slurm_time)
    for line in out.splitlines():
        parts = (line.strip().split("|") + [""] * 7)[:7]
        job_id, state, reason, name, start = parts[0], parts[1], parts[2], parts[3], parts[6]
        if job_id in wanted:
            found[job_id] = {"state": state, "reason": "" if reason == "None" else reason}
            if state == "PENDING" and (epoch := slurm_time(start)) is not None:
                found[job_id]["start"] = epoch  # squeue --start's estimate
        if prefix and name.startswith(prefix):
            named[job_id] = name
    rest = [i for i in ids if i not in found]
    if rest:
        # An array's base id too: sacct names the tasks that never started only under it.
        asked = dict.fromkeys([*rest, *(i.split("_")[0] for i in rest if "_" in i)])
        argv = ["sacct", "-X", "-n", "-P", "-j", ",".join(asked), "-o", "JobID,State,ExitCode"]
        lines = [line.strip().split("|") for line in run(argv).splitlines()]
        ended = per_task(
            (parts[0], {"state": parts[1].split()[0], "exit": parts[2]})
            for parts in lines
            if len(parts) == 3
        )
        for job_id in rest:
            if job_id in ended:
                found[job_id] = ended[job_id]
            elif (state := by_id(ended, job_id)) is not None:
                found[job_id] = {**state, "whole_array": True}
    return {i: found.get(i, {"state": "UNKNOWN"}) for i in ids}, named, usage.__dict__


def read_limits(*, qos: str | None, account: str | None) -> Limits:
    """The user's limits on this cluster, where Slurm shows them (sacctmgr needs slurmdbd: a
    site without accounting has no limits to read, and none are assumed)."""
    user = getpass.getuser()
    cluster = ""
    config = run(["scontrol", "show", "config"])
    for line in config.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            cluster = value.strip()
    try:
        assoc = run(["sacctmgr", "-n", "-P", "show", "assoc", "where", f"user={user}",
                     *([f"cluster={cluster}"] if cluster else []),
                     f"format={','.join(ASSOC_COLUMNS)}"])  # fmt: skip
        qos_out = run(["sacctmgr", "-n", "-P", "show", "qos", f"format={','.join(QOS_COLUMNS)}"])
    except Exception:  # noqa: BLE001 - no accounting here: only MaxArraySize is known
        assoc = qos_out = ""
    return parse_limits(assoc, qos_out, config, qos=qos, account=account)


def _active_jobs() -> str:
    return run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-t", ",".join(SLURM_ACTIVE),
                "-o", "%i|%T|%r|%j|%D|%b|%S|%e"])  # fmt: skip


def slurm_time(text: str) -> float | None:
    """Slurm's `2026-12-02T13:40:00` (this machine's local time, as slurmctld prints it) as an
    epoch; None for N/A, Unknown or an empty field."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


# submitit's parameter names -> sbatch's, for `sbatch --test-only`.
TEST_ONLY_FLAGS = {
    "partition": "--partition", "account": "--account", "qos": "--qos", "nodes": "--nodes",
    "gpus_per_node": "--gpus-per-node", "ntasks_per_node": "--ntasks-per-node",
    "cpus_per_task": "--cpus-per-task", "mem": "--mem", "time": "--time",
    "exclude": "--exclude",
}  # fmt: skip


def start_estimate(params: dict[str, Any]) -> float | None:
    """When Slurm would start a job of these parameters if it were submitted now: `sbatch
    --test-only` (nothing is submitted). None when Slurm gives no time."""
    from lingua_sweep.sweep import remote

    argv = ["sbatch", "--test-only", "--job-name=lingua-sweep-test-only", "--output=/dev/null"]
    for key, flag in TEST_ONLY_FLAGS.items():
        if params.get(key) not in (None, ""):
            argv.append(f"{flag}={params[key]}")
    for key, value in (params.get("additional_parameters") or {}).items():
        argv.append(f"--{key.replace('_', '-')}={value}")
    argv += ["--wrap", "true"]
    result = remote.run(argv, login=None, timeout=SLURM_TIMEOUT_S, check=False)
    # "sbatch: Job 1234 to start at 2026-12-02T13:40:00 using 8 processors on nodes ..."
    words = (result.stderr + result.stdout).split()
    if "start" in words and words.index("start") + 2 < len(words):
        return slurm_time(words[words.index("start") + 2])
    return None


def user_usage(prefix: str) -> dict[str, Any]:
    """The user's active jobs there, apart from those named `prefix...` (this sweep's)."""
    return parse_usage(_active_jobs(), prefix, slurm_time).__dict__


def per_task(rows: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """sacct's rows by job id, each task of an array's line for the tasks that never started
    (`12_[2-3]`) under its own id. A task's own line wins over its array's."""
    own: dict[str, Any] = {}
    ranged: dict[str, Any] = {}
    for job_id, row in rows:
        if "_[" in job_id:
            ranged.update(dict.fromkeys(expand_array(job_id), row))
        else:
            own[job_id] = row
    return {**ranged, **own}


def by_id(rows: dict[str, Any], job_id: str) -> Any:
    """A job's sacct row; for an array task without one, its array's line under the bare base
    id (`12`), which slurmdbd writes before it knows which tasks the record holds: for an array
    cancelled before any task started, that line is every task's (for seconds, under load for
    more than 30). It is not the line of a task that started: a moment after the first task
    split off and the pending rest was cancelled, `12 CANCELLED` showed while the started
    task's own record was not in yet (the poll tells those apart: `whole_array`)."""
    return rows.get(job_id) or (rows.get(job_id.split("_")[0]) if "_" in job_id else None)


def expand_array(job_id: str) -> list[str]:
    """`12_[2-3,5]` (sacct's line for array tasks that never started) -> 12_2, 12_3, 12_5."""
    base, sep, spec = job_id.partition("_[")
    if not sep:
        return [job_id]
    out = []
    for part in spec.rstrip("]").split("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (high.isdigit() or not high):
            out += [f"{base}_{i}" for i in range(int(low), int(high or low) + 1)]
    return out


def find_batch(name: str, since: float | None = None) -> list[str]:
    """Ids of the jobs of one submission (Slurm job name), in array order: for a launcher that
    never heard sbatch's answer. `since`: the submission's time (sacct looks back from there)."""
    ids = set()
    out = run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-n", name, "-o", "%i"])
    ids.update(line.strip() for line in out.splitlines() if line.strip())
    start = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 3600)) if since else ("now-7days")
    )
    out = run(["sacct", "-X", "-n", "-P", "-S", start, "--name", name, "-o", "JobID"])
    ids.update(i for line in out.splitlines() if line.strip() for i in expand_array(line.strip()))
    return sorted(ids, key=_array_order)


def _array_order(job_id: str) -> tuple[int, int]:
    base, _, index = job_id.partition("_")
    return int(base), int(index or 0)


def slurm_duration(text: str) -> float | None:
    """Slurm's `[D-]HH:MM:SS` (or `MM:SS`) in seconds; None for UNLIMITED, Partition_Limit..."""
    days, _, clock = text.strip().rpartition("-")
    try:
        parts = [float(p) for p in clock.split(":")]
        seconds = sum(p * 60**k for k, p in enumerate(reversed(parts)))
        return seconds + 86400 * float(days or 0)
    except ValueError:
        return None


HISTORY_DAYS = 2  # others' jobs that ended this recently say how people there ask for time


def parse_time_used(out: str, me: str) -> float | None:
    """`sacct -P --format=User,Elapsed,Timelimit` rows -> the median share of their time limit
    that other users' jobs used; None with fewer than three such jobs."""
    shares = []
    for line in out.splitlines():
        user, elapsed, limit = ([*line.split("|"), "", ""])[:3]
        if user in ("", me):
            continue
        ran, asked = slurm_duration(elapsed), slurm_duration(limit)
        if ran and asked:  # a job that never ran, or no limit, says nothing
            shares.append(min(ran / asked, 1.0))
    return statistics.median(shares) if len(shares) >= 3 else None


def others_time_used(partition: str | None, me: str | None = None) -> float | None:
    """How much of their time limits other users' jobs that ended there lately used (median):
    Slurm's start estimates count every running job to its limit, so this is how late they
    come out, before a sweep has seen a start of its own. None where sacct shows no one else
    (PrivateData=jobs) or too few."""
    argv = ["sacct", "-a", "-X", "-n", "-P", f"--starttime=now-{HISTORY_DAYS}days",
            "--endtime=now", "--state=CD,F,TO,CA,OOM,NF,PR",
            "--format=User,Elapsed,Timelimit"]  # fmt: skip
    if partition:
        argv.append(f"--partition={partition}")
    return parse_time_used(run(argv), me or getpass.getuser())


# A job without --time is assumed to run a day: the partition's limit, as Slurm assumes it.
DEFAULT_TIME_MIN = 1440


def expand_hostlist(text: str) -> list[str]:
    """Slurm's `alpha[1-3,05],beta7` -> alpha1, alpha2, alpha3, alpha05, beta7 (one bracket
    group per name: what sinfo and scontrol print for a cluster's nodes)."""
    out, depth, item = [], 0, ""
    for char in text.strip() + ",":
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            prefix, sep, rest = item.partition("[")
            ranges, _, suffix = rest.partition("]")
            for part in ranges.split(",") if sep else [""]:
                low, _, high = part.partition("-")
                if not sep:
                    out.append(item)
                elif low.isdigit() and (high.isdigit() or not high):
                    width = len(low)  # zero-padded: [01-10]
                    out += [f"{prefix}{k:0{width}d}{suffix}"
                            for k in range(int(low), int(high or low) + 1)]  # fmt: skip
            item = ""
        elif char != "," or depth:
            item += char
    return [name for name in out if name]


def parse_reservations(out: str) -> list[dict[str, Any]]:
    """`scontrol show reservation -o` -> [{name, start, end, nodes}] (epochs, node names)."""
    found = []
    for line in out.splitlines():
        fields = dict(word.partition("=")[::2] for word in line.split() if "=" in word)
        start, end = slurm_time(fields.get("StartTime", "")), slurm_time(fields.get("EndTime", ""))
        if "ReservationName" in fields and start is not None and end is not None:
            nodes = fields.get("Nodes", "(null)")
            nodes = expand_hostlist(nodes) if nodes != "(null)" else []
            found.append({"name": fields["ReservationName"], "start": start, "end": end,
                          "nodes": nodes})  # fmt: skip
    return found


def reserved_nodes(params: dict[str, Any], now: float | None = None) -> dict[str, list[float]]:
    """The nodes a reservation covers, now or later (`scontrol show reservation`): name ->
    [from, until], when a job of these sbatch parameters cannot start on it (epoch): its time
    limit would run into the reservation. (`sbatch --test-only` cannot tell those apart: on the
    testbed it told a 5-minute job 60 minutes, a pending job's limit held by a maintenance
    reservation, and Slurm started one like it at once.)"""
    found = parse_reservations(run(["scontrol", "show", "reservation", "-o"]))
    limit_s = float(params.get("time") or DEFAULT_TIME_MIN) * 60
    return kept_nodes([(r["start"], r["end"], r["nodes"]) for r in found],
                      time.time() if now is None else now, limit_s)  # fmt: skip


def kept_nodes(
    reservations: list[tuple[float, float, list[str]]], now: float, limit_s: float
) -> dict[str, list[float]]:
    """(start, end, nodes) reservations -> each node they cover, now or later: [from, until],
    when a job of this time limit cannot start on it (from = the reservation's start less the
    limit), windows that meet merged. Times in any one clock (the simulator's is its own)."""
    windows: dict[str, list[list[float]]] = {}
    for start, end, nodes in reservations:
        if end > now:
            for node in nodes:
                windows.setdefault(node, []).append([start - limit_s, end])
    out = {}
    for node, spans in windows.items():
        spans.sort()
        merged = [spans[0]]
        for span in spans[1:]:
            if span[0] <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], span[1])
            else:
                merged.append(span)
        # The first window not yet over: the one a job placed now can meet.
        out[node] = next(w for w in merged if w[1] > now)
    return out
