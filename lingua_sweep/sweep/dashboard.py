"""`lingua-sweep dashboard SWEEP_DIR [--port N]`: an async Optuna sweep's study in the browser.

It serves the study with optuna-dashboard, read-only from the launcher's point of view (the
launcher keeps telling the study; the dashboard only reads it), while the sweep runs or after.
Each trial carries where it runs as user attrs (cluster, slurm_job, state, step, job), which
the dashboard shows on the trial's page.

optuna-dashboard 0.10.3 with bottle 0.12: hydra-optuna-sweeper pins optuna < 3, and 0.10 runs
on Optuna 2.10 (checked: its API and its pages in headless Chromium); bottle 0.13 serves the
dashboard's gzipped bundle without its Content-Encoding, and the page never loads.
"""

import sys
from pathlib import Path

from lingua_sweep.errors import UserError


def study_storage(sweep_dir: str | Path) -> tuple[str, str]:
    """(storage URL, study name) of the sweep's study, from its journal."""
    from omegaconf import OmegaConf

    from lingua_sweep.sweep.verbs import open_journal

    journal = open_journal(sweep_dir)
    header = journal.replay().header
    study = header.get("study")
    if not study:
        raise UserError(
            f"{journal.dir} is not an Optuna sweep (no study in its journal); the dashboard "
            "shows hydra/sweeper=async_optuna sweeps"
        )
    storage = None
    multirun = journal.dir / "multirun.yaml"
    if multirun.exists():
        storage = OmegaConf.select(OmegaConf.load(multirun), "hydra.sweeper.storage")
    return storage or f"sqlite:///{journal.dir / 'optuna.db'}", study["name"]


def serve(sweep_dir: str, *, host: str, port: int) -> int:
    storage, name = study_storage(sweep_dir)
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise UserError(
            "the dashboard needs optuna-dashboard: pip install 'lingua-sweep[dashboard]'"
        ) from None
    print(f"study {name!r} of {sweep_dir}: http://{host}:{port}/dashboard (Ctrl-C stops)",
          file=sys.stderr, flush=True)  # fmt: skip
    try:
        run_server(storage, host=host, port=port)
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port}: {e.strerror or e}; use --port") from e
    return 0
