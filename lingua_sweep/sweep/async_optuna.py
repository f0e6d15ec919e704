"""The `async_optuna` sweeper: Optuna's ask/tell over the sweep controller, with pruning.

hydra-optuna-sweeper asks `n_jobs` trials, launches them and waits for the slowest; here at
most `n_jobs` trials are in flight and the next one is asked and dispatched the moment one ends.
Its config surface and override grammar are hydra-optuna-sweeper's: this class is its
`OptunaSweeperImpl` with another `sweep` loop.

- The study lives in the sweep dir (`sqlite:///<sweep dir>/optuna.db` unless `storage` says
  otherwise) next to the journal, under the same lock: rerunning the command on the same
  `hydra.sweep.dir` continues both, and `n_trials` counts the trials already there.
- The journal maps jobs to trials (each job records its trial number), so after a crash a RUNNING
  trial whose job ended is told now, and one whose job still runs is watched again.
- Every Optuna call happens here, in the launcher: compute nodes only write metrics.jsonl, which
  the controller reads while they run. Each new `loss/val` is reported by step; when the pruner
  says so the job is cancelled, and the trial is PRUNED in the study, the journal and the table.
"""

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import Trial, TrialState

from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from lingua_sweep.errors import UserError
from lingua_sweep.results_table import fmt_override
from lingua_sweep.sweep import clock, faultpoint
from lingua_sweep.sweep.compose import experiment_name
from lingua_sweep.sweep.journal import decode_value
from lingua_sweep.sweep.launch import (
    SweepConfigError,
    SweepFailed,
    build_controller,
    cancel_on_ctrl_c,
    interruptible,
    one_line_errors,
)
from lingua_sweep.sweep.monitor import Monitor
from lingua_sweep.sweep.params import LauncherParams

log = logging.getLogger(__name__)
# Marks the trials this sweep asked for: a study in a shared storage has other sweeps' trials.
SWEEP_ATTR = "sweep_dir"
# A trial whose job was cancelled (Ctrl-C, `lingua-sweep cancel`, a scancel) is told FAIL with
# `stopped` True: it is not a failure of its parameters, counts toward neither n_trials nor
# max_failure_rate, and its parameters are enqueued again (`retry_of` on the new trial).
STOPPED_ATTR = "stopped"
RETRY_ATTR = "retry_of"


def counted(t) -> bool:
    """Whether a trial is one of the study's n_trials: asked, and not stopped by a person."""
    return t.state != TrialState.WAITING and t.user_attrs.get(STOPPED_ATTR) is not True


@dataclass
class Flight:
    """A trial whose job is not final yet."""

    index: int  # its job in the journal
    trial: Trial
    reported: set[int] = field(default_factory=set)  # steps already reported to the study
    shown: dict[str, Any] = field(default_factory=dict)  # where it runs, as the study has it


class AsyncOptunaSweep(OptunaSweeperImpl):
    def __init__(self, *, pruner: Any = None, **optuna_sweeper_params: Any) -> None:
        super().__init__(**optuna_sweeper_params)
        self.pruner = pruner
        self.flights: dict[int, Flight] = {}  # trial number -> flight
        self.n_asked = 0
        self.next_index = 0
        self.stop_reason: str | None = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra_plugins.lingua_sweep_launcher.multicluster_launcher import MulticlusterLauncher

        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if not isinstance(self.launcher, MulticlusterLauncher):
            raise SweepConfigError(
                "hydra/sweeper=async_optuna dispatches its trials through the multicluster "
                "launcher: add hydra/launcher=multicluster"
            )

    def sweep(self, arguments: list[str]) -> None:
        interruptible()
        with one_line_errors():
            self._sweep(list(arguments))

    # --- one sweep ------------------------------------------------------------------------

    def _sweep(self, arguments: list[str]) -> None:
        p = LauncherParams(**self.launcher.params)
        if p.dry_run or p.detach:
            raise UserError(
                "hydra.launcher.dry_run/detach: async_optuna asks each trial as a slot frees up, "
                "so it has no plan to print and must keep running"
            )
        if self.n_jobs < 1 or not 0.0 <= self.max_failure_rate <= 1.0:
            raise UserError("hydra.sweeper: n_jobs must be >= 1, max_failure_rate in [0, 1]")
        self._search_space(arguments)
        directions = self._get_directions()
        if self.pruner is not None and len(directions) > 1:
            raise UserError("hydra.sweeper.pruner: Optuna cannot prune multi-objective studies")
        monitor = Monitor(live=p.live)
        controller = build_controller(self.launcher, p, monitor=monitor)
        controller.want_metrics = True  # running jobs' metrics.jsonl: the pruner's reports
        self.controller = controller
        name = self.study_name or experiment_name(self.config)
        controller.open(header={"name": experiment_name(self.config),
                                "study": {"name": name, "directions": directions}})  # fmt: skip
        refused = False
        try:
            OmegaConf.save(self.config, controller.sweep_dir / "multirun.yaml")
            quiet_storage_logs()
            self.study = optuna.create_study(
                study_name=name,
                storage=self.storage or f"sqlite:///{controller.sweep_dir / 'optuna.db'}",
                sampler=self.sampler,
                pruner=self.pruner or optuna.pruners.NopPruner(),
                directions=directions,
                load_if_exists=True,
            )
            self._preflight()
            self._reconcile()
            self._loop(p.poll_interval_s)
        except KeyboardInterrupt:
            cancel_on_ctrl_c(controller, monitor, settle=self._settle)
        except UserError:
            refused = True
            raise
        finally:
            monitor.stop()
            controller.close()
            if refused:
                self.study = None  # its storage (optuna.db) goes with the refused sweep
                controller.discard()
        monitor.summary(controller)
        problem = self._write_results()
        if problem:
            raise SweepFailed(problem)

    def _search_space(self, arguments: list[str]) -> None:
        """hydra-optuna-sweeper's parsing: `params:` and command-line sweeps -> distributions."""
        self._process_searchspace_config()
        try:
            dists, self.fixed = create_params_from_overrides(
                self._parse_sweeper_params_config() + arguments
            )
        except Exception as e:  # noqa: BLE001 - Hydra's grammar errors have several types
            raise UserError(f"hydra.sweeper.params / sweep overrides: {e}") from e
        self.dists = {**(self.search_space_distributions or {}), **dists}
        for name in self.fixed:
            self.dists.pop(name, None)
        if getattr(self.sampler, "func", None) is optuna.samplers.GridSampler:  # a partial
            grid = {n: self._to_grid_sampler_choices(d) for n, d in self.dists.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))

    def _preflight(self) -> None:
        """Every choice and both ends of every range composed and validated before anything is
        asked or submitted: a mistake in the search space is one line now, not a failed trial
        an hour in."""
        c = self.controller
        first = {n: edges(d)[0] for n, d in self.dists.items()}
        cluster = c.registry[c.names[0]] if c.names else None
        for name, dist in self.dists.items():
            for value in edges(dist):
                values = {**first, name: value, **self.fixed}
                overrides = [f"{k}={v}" for k, v in values.items()]
                c.composer.job_config(overrides, len(c.state.jobs), cluster, str(c.sweep_dir))

    def _reconcile(self) -> None:
        """A rerun on the same sweep dir: the journal's jobs against the study's trials."""
        c = self.controller
        for job in sorted(c.state.jobs.values(), key=lambda j: j.index):
            c.register([job.overrides], job.index, trials=[job.trial])  # same config, or error
        self.next_index = max(c.state.jobs, default=-1) + 1
        by_trial = {j.trial: j for j in c.state.jobs.values() if j.trial is not None}
        trials = self.study.get_trials(deepcopy=False)
        self.n_asked = sum(map(counted, trials))
        if trials:  # a seeded sampler would otherwise propose the first run's trials again
            self.study.sampler.reseed_rng()
            log.info("study %s: continuing after %d trial(s)", self.study.study_name,
                     self.n_asked)  # fmt: skip
        for t in trials:
            if t.state != TrialState.RUNNING:
                continue
            job = by_trial.get(t.number)
            if job is not None:
                trial = Trial(self.study, t._trial_id)
                self.flights[t.number] = Flight(job.index, trial, set(t.intermediate_values))
            elif self._ours(t):
                self._start(Trial(self.study, t._trial_id))  # asked; killed before its record
        # Stopped trials whose parameters a kill left unenqueued.
        retried = {t.user_attrs.get(RETRY_ATTR) for t in trials}
        for t in trials:
            if t.user_attrs.get(STOPPED_ATTR) is True and t.number not in retried and self._ours(t):
                self._retry_later(t.number, t.params)
        self._settle()

    def _ours(self, t) -> bool:
        """A trial of this sweep: its study is the sweep's own (optuna.db in the sweep dir),
        or it says it is this sweep dir, however that dir was spelled then (a kill between
        `ask` and the attribute leaves none: in a shared storage such a trial is unknowable)."""
        if not self.storage:
            return True
        recorded = t.user_attrs.get(SWEEP_ATTR)
        return recorded is not None and same_dir(recorded, self.controller.sweep_dir)

    def _retry_later(self, number: int, params: dict[str, Any]) -> None:
        self.study.enqueue_trial(params)  # Optuna 2.10: no user_attrs here; set just after
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        newest = max(waiting, key=lambda t: t.number)
        self.study._storage.set_trial_user_attr(newest._trial_id, RETRY_ATTR, number)
        log.info("trial %d was stopped: its parameters are enqueued again", number)

    def _loop(self, poll_interval_s: float) -> None:
        c = self.controller
        while True:
            if c.state.cancel_requested and not self.stop_reason:
                self.stop_reason = "the sweep was cancelled"
            self._fill()
            c.cycle()
            self._watch()
            ended = self._settle()
            if not self.flights and (self.stop_reason or self.n_asked >= self.n_trials):
                return
            if ended and self._wants_more():
                continue  # a slot just freed up: ask and dispatch now, not a poll later
            clock.sleep(poll_interval_s)

    # --- asking ---------------------------------------------------------------------------

    def _wants_more(self) -> bool:
        return (not self.stop_reason and len(self.flights) < self.n_jobs
                and self.n_asked < self.n_trials)  # fmt: skip

    def _fill(self) -> None:
        while self._wants_more():
            self.n_asked += 1
            trial = self.study.ask()
            faultpoint.hit("study.asked")
            trial.set_user_attr(SWEEP_ATTR, str(self.controller.sweep_dir))
            self._start(trial)

    def _start(self, trial: Trial) -> None:
        """The trial's overrides (hydra-optuna-sweeper's own code), recorded as the next job."""
        overrides = list(self._configure_trials([trial], self.dists, self.fixed)[0])
        try:
            [index] = self.controller.register([overrides], self.next_index, trials=[trial.number])
        except UserError as e:  # a combination the search space allows but the config does not
            log.error("trial %d (%s): %s", trial.number, " ".join(overrides), e)
            trial.set_user_attr("error", str(e))
            self._tell(trial, TrialState.FAIL)
            self._check_failures()
            return
        self.next_index = index + 1
        self.flights[trial.number] = Flight(index, trial)
        log.info("trial %d -> job #%d: %s", trial.number, index,
                 " ".join(map(fmt_override, overrides)))  # fmt: skip

    # --- watching -------------------------------------------------------------------------

    def _watch(self) -> None:
        """Reports each running trial's new `loss/val` values; prunes where the pruner says."""
        c = self.controller
        for number, flight in self.flights.items():
            job = c.state.jobs[flight.index]
            self._show(flight, job)
            if (
                job.final
                or job.stopping
                or job.state != "RUNNING"
                or len(self.study.directions) > 1
            ):
                continue
            tail = c.tails.get(flight.index)
            new = {s: v for s, v in (tail.val if tail else {}).items()
                   if s not in flight.reported}  # fmt: skip
            for step in sorted(new):
                flight.trial.report(new[step], step)
                flight.reported.add(step)
            if new and self.pruner is not None and flight.trial.should_prune():
                self._prune(number, flight, max(new))

    def _show(self, flight: Flight, job) -> None:
        """Where the trial runs, as user attrs (the dashboard shows them); written on change."""
        tail = self.controller.tails.get(flight.index)
        now = {"cluster": job.cluster, "slurm_job": job.job_id, "state": job.state,
               "step": tail.step if tail else None, "job": flight.index}  # fmt: skip
        for key, value in now.items():
            if value is not None and flight.shown.get(key) != value:
                flight.trial.set_user_attr(key, value)
                flight.shown[key] = value

    def _prune(self, number: int, flight: Flight, step: int) -> None:
        """Cancels the job; once Slurm confirms, it is PRUNED with its step and `_settle` tells
        the study."""
        note = f"pruned at step {step}"
        self.controller.cancel_job(flight.index, "PRUNED", note, step=step)
        log.info("trial %d (job #%d) %s", number, flight.index, note)

    # --- telling --------------------------------------------------------------------------

    def _settle(self) -> bool:
        """Tells the study about every in-flight trial whose job is now final."""
        ended = [n for n, f in self.flights.items() if self.controller.state.jobs[f.index].final]
        for number in ended:
            flight = self.flights.pop(number)
            result = self.controller.state.jobs[flight.index].result or {}
            state, values, error = TrialState.FAIL, None, result.get("error")
            if result.get("status") == "COMPLETED":
                try:
                    values = self._values(decode_value(result))
                    state = TrialState.COMPLETE
                except (TypeError, ValueError) as e:
                    error = f"the task returned {decode_value(result)!r}: {e}"
            elif result.get("status") == "PRUNED":
                state = TrialState.PRUNED
            stopped = result.get("status") == "CANCELLED"
            if stopped:
                flight.trial.set_user_attr(STOPPED_ATTR, True)
                self.n_asked -= 1  # not one of n_trials: its parameters run again
            if state == TrialState.FAIL and error:
                flight.trial.set_user_attr("error", str(error)[:1000])
            self._show(flight, self.controller.state.jobs[flight.index])
            self._tell(flight.trial, state, values)
            faultpoint.hit("study.told")
            if stopped:
                self._retry_later(number, flight.trial.params)
            log.info("trial %d (job #%d): %s%s", number, flight.index, state.name,
                     f" {values}" if values else f": {error}" if error else "")  # fmt: skip
        if ended:
            self._check_failures()
        return bool(ended)

    def _values(self, value: Any) -> list[float]:
        n = len(self.study.directions)
        values = [float(value)] if n == 1 else [float(v) for v in value]
        if len(values) != n or not all(math.isfinite(v) for v in values):
            raise ValueError(f"expected {n} finite float(s)")
        return values

    def _tell(self, trial: Trial, state: TrialState, values: list[float] | None = None) -> None:
        try:
            self.study.tell(trial, values=values, state=state)
        except RuntimeError as e:  # GridSampler stops the study once its grid is done
            if "Study.stop" not in str(e):
                raise

    def _check_failures(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state.is_finished() and counted(t)]
        failed = sum(t.state == TrialState.FAIL for t in finished)
        # Over at least n_jobs trials: one early failure is not yet a rate.
        if failed > self.max_failure_rate * max(len(finished), self.n_jobs):
            self.stop_reason = self.stop_reason or (
                f"{failed} of {len(finished)} finished trials failed (more than "
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate}); see "
                f"`lingua-sweep results {self.controller.sweep_dir}`"
            )

    # --- the end --------------------------------------------------------------------------

    def _write_results(self) -> str | None:
        """optimization_results.yaml, as hydra-optuna-sweeper writes it; the problem, if any."""
        every = self.study.get_trials(deepcopy=False)
        trials = [t for t in every if counted(t)]
        counts = {s.name: sum(t.state == s for t in trials) for s in TrialState if s.is_finished()}
        out: dict[str, Any] = {"name": "async_optuna", "study_name": self.study.study_name,
                               "n_trials": len(trials), "states": counts,
                               "stopped": sum(t.state.is_finished() for t in every) - sum(
                                   counts.values())}  # fmt: skip
        if counts["COMPLETE"] and len(self.study.directions) == 1:
            best = self.study.best_trial
            out |= {"best_params": best.params, "best_value": best.value, "best_trial": best.number}
            log.info("best value %.4g at %s (trial %d)", best.value,
                     " ".join(fmt_override(f"{k}={v}") for k, v in best.params.items()),
                     best.number)  # fmt: skip
        elif counts["COMPLETE"]:
            out["solutions"] = [{"params": t.params, "values": t.values}
                                for t in self.study.best_trials]  # fmt: skip
        path = self.controller.sweep_dir / "optimization_results.yaml"
        OmegaConf.save(OmegaConf.create(out), path)
        if self.stop_reason:
            return self.stop_reason
        if not counts["COMPLETE"] and counts["FAIL"]:
            return f"no trial completed ({counts['FAIL']} failed); see lingua-sweep results"
        return None


def quiet_storage_logs() -> None:
    """The study's storage says nothing a person needs on the console (alembic's plugin setup
    lines, Optuna's "A new study created"): warnings and errors only."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def same_dir(a: str | Path, b: str | Path) -> bool:
    """The same directory, however spelled (a symlink, another mount of it)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def edges(dist) -> list[Any]:
    """The values worth validating of a distribution: every choice, or both ends of a range."""
    choices = getattr(dist, "choices", None)
    return list(choices) if choices is not None else [dist.low, dist.high]
