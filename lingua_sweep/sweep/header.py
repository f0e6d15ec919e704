"""What a sweep records about itself: the command, the code it runs, the clusters it may use.

Written once, as the journal's first record; `resume`, `status` and `cancel` need nothing else.
"""

import inspect
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any


def project_root(task_function: Callable) -> Path:
    """The app's project dir (what reaches a remote login node): the nearest parent of the task
    function's file with a pyproject.toml or .git, else that file's dir."""
    try:
        start = Path(inspect.getfile(task_function)).resolve().parent
    except (TypeError, OSError):  # a callable object, or code typed at a prompt
        try:
            start = Path(inspect.getfile(type(task_function))).resolve().parent
        except (TypeError, OSError):
            return Path.cwd()
    for d in (start, *start.parents):
        if (d / "pyproject.toml").exists() or (d / ".git").exists():
            return d
    return start


def sweep_header(controller) -> dict[str, Any]:
    root = controller.code_root
    return {
        "id": uuid.uuid4().hex[:8],
        "version": 1,
        "sweep_dir": str(controller.sweep_dir),
        "argv": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "clusters": controller.names,
        # The definitions themselves: `status` and `cancel` reach the clusters from the journal.
        "cluster_configs": {n: asdict(controller.registry[n]) for n in controller.names},
        "params": asdict(controller.p),
        "code": git_version(root) if root else {},
    }


def git_version(root: Path) -> dict[str, Any]:
    """The commit the sweep's code is at, and whether the work tree differs from it."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {"root": str(root)}
    if commit.returncode != 0:
        return {"root": str(root)}
    return {"root": str(root), "commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
