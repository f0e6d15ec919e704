import socket
import subprocess
import time

import pytest

from lingua_sweep.sweep import remote
from lingua_sweep.sweep.remote import RemoteError

TRICKY = ["a b", "$HOME", "it's", 'say "hi"', "; rm -rf /tmp/nothing", "*", ""]

# --- locally -------------------------------------------------------------------------------


def test_run_locally_captures_output():
    proc = remote.run(["printf", "%s|", *TRICKY], login=None, timeout=10)
    assert proc.stdout == "|".join(TRICKY) + "|"
    assert proc.returncode == 0


def test_run_input_and_env():
    proc = remote.run(["cat"], login=None, timeout=10, input="piped\n")
    assert proc.stdout == "piped\n"
    proc = remote.run(["sh", "-c", "echo $FOO"], login=None, timeout=10, env={"FOO": "x y"})
    assert proc.stdout == "x y\n"


def test_failure_names_command_code_and_stderr():
    with pytest.raises(RemoteError) as e:
        remote.run(["sh", "-c", "echo out; echo boom >&2; exit 3"], login=None, timeout=10)
    msg = str(e.value)
    assert "sh -c" in msg and "exit 3" in msg and "boom" in msg and "locally" in msg
    assert e.value.returncode == 3 and e.value.reason == "exit 3: boom"
    proc = remote.run(["sh", "-c", "exit 3"], login=None, timeout=10, check=False)
    assert proc.returncode == 3


def test_timeout_kills_and_raises():
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="timed out after 1s") as e:
        remote.run(["sh", "-c", "sleep 30 & sleep 30"], login=None, timeout=1)
    assert time.monotonic() - t0 < 5
    assert e.value.returncode is None


def test_missing_program():
    with pytest.raises(RemoteError, match="cannot run"):
        remote.run(["no-such-program-xyz"], login=None, timeout=5)


def test_ssh_is_batch_mode_with_connect_timeout_over_one_shared_connection(tmp_path, monkeypatch):
    monkeypatch.setenv("LINGUA_SWEEP_SSH_DIR", str(tmp_path / "ssh"))
    cmd = remote.ssh_command(["-F", "cfg"], connect_timeout=7.5)
    assert cmd[:5] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=7"]
    assert cmd[-2:] == ["-F", "cfg"]  # the cluster's own options come last: they win
    options = dict(o.split("=", 1) for o in cmd[6:-2:2])  # the -o values after the first two
    assert options == {
        "ServerAliveInterval": "10",  # a dead connection is dropped in ~30 s, not a timeout
        "ServerAliveCountMax": "3",
        "ControlMaster": "auto",
        "ControlPath": f"{tmp_path / 'ssh'}/%C",
        "ControlPersist": str(remote.CONTROL_PERSIST_S),
    }
    assert oct((tmp_path / "ssh").stat().st_mode & 0o777) == "0o700"
    assert remote.ssh_command(connect_timeout=3, multiplex=False)[5:] == list(remote.KEEPALIVE)


def test_a_control_dir_others_can_enter_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "ssh"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv("LINGUA_SWEEP_SSH_DIR", str(shared))
    with pytest.raises(RuntimeError, match="mode 700"):
        remote.ssh_command(connect_timeout=3)


def test_sync_code_locally(tmp_path):
    src, dest = _tree(tmp_path / "src"), tmp_path / "dest"
    remote.sync_code(src, None, str(dest), timeout=30)
    _check_synced(dest)


# --- over ssh, on the testbed's beta login node --------------------------------------------


@pytest.fixture
def beta(slurm_testbed):
    return {"login": slurm_testbed.beta_login, "ssh_options": ["-F", str(slurm_testbed.ssh_config)]}


@pytest.mark.slurm
def test_ssh_round_trips_arguments_exactly(beta):
    proc = remote.run(["printf", "%s|", *TRICKY], timeout=15, **beta)
    assert proc.stdout == "|".join(TRICKY) + "|"


@pytest.mark.slurm
def test_ssh_session_is_betas_login_node(slurm_testbed, beta):
    proc = remote.run(["sh", "-c", "echo $SLURM_CONF"], timeout=15, **beta)
    assert proc.stdout.strip() == str(slurm_testbed.beta_slurm_conf)
    proc = remote.run(["sinfo", "--noheader", "--partition=batch", "--format=%R %D %t"],
                      timeout=15, **beta)  # fmt: skip
    assert proc.stdout.split() == ["batch", "2", "idle"]


@pytest.mark.slurm
def test_ssh_input_env_and_failure(beta):
    assert remote.run(["cat"], timeout=15, input=b"\x00bytes", **beta).stdout == "\x00bytes"
    proc = remote.run(["sh", "-c", 'echo "$A"'], timeout=15, env={"A": "1 2 'q'"}, **beta)
    assert proc.stdout == "1 2 'q'\n"
    with pytest.raises(RemoteError) as e:
        remote.run(["sh", "-c", "echo nope >&2; exit 4"], timeout=15, **beta)
    assert e.value.returncode == 4 and "on beta-hn" in str(e.value) and "nope" in str(e.value)


@pytest.mark.slurm
def test_ssh_to_closed_port_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as e:
        remote.run(["true"], login="127.0.0.1", ssh_options=["-F", "/dev/null", "-p", str(port)],
                   timeout=10)  # fmt: skip
    assert time.monotonic() - t0 < 5
    assert e.value.returncode == 255 and "refused" in e.value.reason


@pytest.mark.slurm
def test_sbatch_and_sacct_over_ssh(beta, slurm_testbed):
    out = remote.run(
        ["sbatch", "--parsable", "--output=/dev/null", f"--chdir={slurm_testbed.state_dir}",
         "--wrap", "true"], timeout=15, **beta,
    ).stdout  # fmt: skip
    job = out.strip().split(";")[0]
    deadline = time.monotonic() + 30
    state = ""
    while time.monotonic() < deadline and state != "COMPLETED":
        argv = ["sacct", "-n", "-X", "-P", "-j", job, "--format=Cluster,State"]
        state_line = remote.run(argv, timeout=15, **beta).stdout.strip()
        cluster, _, state = state_line.partition("|")
        time.sleep(0.3)
    assert (cluster, state) == ("beta", "COMPLETED")


@pytest.mark.slurm
def test_sacct_works_on_alpha(slurm_testbed, tmp_path):
    env = slurm_testbed.env_alpha()
    argv = ["sbatch", "--parsable", "--output=/dev/null", f"--chdir={tmp_path}", "--wrap", "true"]
    job = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=15, check=True)
    job_id = job.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline and not line.endswith("COMPLETED"):
        argv = ["sacct", "-n", "-X", "-P", "-j", job_id, "--format=Cluster,State"]
        line = remote.run(argv, login=None, timeout=15, env=env).stdout.strip()
        time.sleep(0.3)
    assert line == "alpha|COMPLETED"


@pytest.mark.slurm
def test_sync_code_over_ssh(tmp_path, beta, slurm_testbed):
    src = _tree(tmp_path / "src")
    dest = slurm_testbed.state_dir / "test_sync" / str(time.time_ns())
    remote.sync_code(src, beta["login"], str(dest), beta["ssh_options"], timeout=60)
    _check_synced(dest)
    # The cluster's own .venv survives a later sync; deleted sources disappear.
    (dest / ".venv").mkdir()
    (src / "pkg" / "mod.py").unlink()
    remote.sync_code(src, beta["login"], str(dest), beta["ssh_options"], timeout=60)
    assert (dest / ".venv").is_dir() and not (dest / "pkg" / "mod.py").exists()
    subprocess.run(["rm", "-rf", str(dest)], check=True, timeout=30)


def _tree(root):
    for rel in ["train.py", "pkg/mod.py", "pkg/outputs.py", "conf/x.yaml", ".git/HEAD",
                ".venv/bin/python", "outputs/run/metrics.jsonl", "multirun/a", "wandb/run",
                "pkg/__pycache__/mod.pyc", "lingua_sweep.egg-info/PKG-INFO"]:  # fmt: skip
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
    return root


def _check_synced(dest):
    assert (dest / "train.py").read_text() == "train.py"
    assert (dest / "pkg" / "mod.py").exists() and (dest / "pkg" / "outputs.py").exists()
    assert (dest / "conf" / "x.yaml").exists()
    for skipped in [".git", ".venv", "outputs", "multirun", "wandb", "pkg/__pycache__",
                    "lingua_sweep.egg-info"]:  # fmt: skip
        assert not (dest / skipped).exists(), skipped
