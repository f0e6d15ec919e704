"""`lingua-sweep dashboard`: a running async Optuna sweep's study, loaded in headless Chromium;
the trials are read from the rendered page and from the dashboard's API."""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import optuna
import pytest
from sweep_helpers import LINGUA_SWEEP, journal_records, wait_for
from test_sweep_async_optuna import APP_STUDY, app_cmd, env


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "headless Chromium is not installed (tests/install_system_deps.sh installs it)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browse(browser: str, url: str, *args: str) -> str:
    """What Chromium made of the page once its scripts ran (stdout: the DOM with --dump-dom)."""
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--virtual-time-budget=15000", "--window-size=1400,900", *args, url]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_the_dashboard_shows_a_running_studys_trials_and_where_they_run(tmp_path):
    browser = chromium()
    sweep = tmp_path / "sweep"
    # Trials of rank_app that sleep 5 s (the study, not the trainer, is on the page): the second
    # pair still runs while Chromium loads it, at no CPU cost to the rest of the run.
    cmd = app_cmd(sweep, "hydra.sweeper.n_trials=4", "sleep_s=5",
                  "value=tag(log,interval(1e-4,1e-2))")  # fmt: skip
    run = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    port = free_port()
    server = None
    try:
        wait_for(lambda: any(r["kind"] == "result" for r in journal_records(sweep)), 120,
                 "a first trial to finish")  # fmt: skip
        server = subprocess.Popen(
            [LINGUA_SWEEP, "dashboard", str(sweep), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        base = f"http://127.0.0.1:{port}"

        def answers():
            try:
                return get_json(f"{base}/api/studies")["study_summaries"]
            except OSError:
                return None

        [summary] = wait_for(answers, 30, "the dashboard to answer")
        study_id = summary["study_id"]
        # What is finished before the page loads is finished on it (a trial can end meanwhile).
        study = optuna.load_study(study_name=APP_STUDY, storage=f"sqlite:///{sweep / 'optuna.db'}")
        done = [t.number for t in study.trials if t.state.is_finished()]
        dom = browse(browser, f"{base}/dashboard/studies/{study_id}/trials", "--dump-dom")
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
        shown = {int(n): state for n, state in re.findall(r"Trial (\d+) (\w+)", text)}
        assert done and set(done) <= set(shown), (done, shown)  # the page lists what is done
        assert all(shown[n] == "Complete" for n in done), shown
        trials = get_json(f"{base}/api/studies/{study_id}")["trials"]
        attrs = {t["number"]: {a["key"]: a["value"] for a in t["user_attrs"]} for t in trials}
        assert all(a.get("cluster") == "local" and "job" in a for a in attrs.values()), attrs
        shot = tmp_path / "dashboard.png"
        browse(browser, f"{base}/dashboard/studies/{study_id}", f"--screenshot={shot}")
        assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
        assert run.wait(timeout=300) == 0
    finally:
        run.kill()
        if server is not None:
            server.terminate()
            server.wait(timeout=10)


def test_the_dashboard_of_a_grid_sweep_is_one_line(tmp_path):
    (tmp_path / "journal.jsonl").write_text(
        json.dumps({"kind": "sweep", "t": time.time(), "name": "grid", "id": "x"}) + "\n"
    )
    out = subprocess.run([LINGUA_SWEEP, "dashboard", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "not an Optuna sweep" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
