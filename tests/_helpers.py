"""Plain helpers shared by the test files (the fixtures are in conftest.py).

Test modules import this file by name (``from _helpers import ...``): pytest puts this folder
on ``sys.path``. Nothing here is sent to Ray workers (they import tests/_trivial.py and
benchmarks/_search_trivial.py).
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FAST = HERE / "spaces" / "fast.yaml"  # the test-only search space: epochs of about a second
WAIT = 600  # seconds: upper bound of any wait on a (possibly busy) machine


# -- spaces and YAML files ----------------------------------------------------------------------
def fast_space() -> dict:
    """A fresh copy of tests/spaces/fast.yaml as a dict (callers change it freely)."""
    return yaml.safe_load(FAST.read_text())


def write_yaml(path: Path, data: dict) -> Path:
    """Write ``data`` as YAML (key order kept) and return ``path``."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Optimizer steps of one epoch of the Trainer on ``train_size`` images: full batches
    only (the last partial batch is dropped while one full batch exists)."""
    return train_size // batch_size if train_size >= batch_size else 1


# -- what a finished (or running) experiment wrote ----------------------------------------------
def write_ray_state(folder: Path, statuses: dict[str, str], stamp: str = "2026-12-01_00-00-00") -> Path:
    """Ray's ``experiment_state-<stamp>.json`` in ``folder``, holding the trials ``statuses``
    (trial id -> RUNNING, TERMINATED, ...) in Ray 2.60's layout (benchmarks/_search_experiment.py)."""
    from _search_experiment import _state_entry

    rng = random.Random(0)
    entries = [_state_entry(rng, tid, {"ssam_tune": {"trial_id": tid, "label": tid}},
                            {"trial_id": tid, "epoch": 1, "status": "running"}, status)
               for tid, status in statuses.items()]
    path = folder / f"experiment_state-{stamp}.json"
    path.write_text(json.dumps({"trial_data": entries, "runner_data": {}, "stats": {}}))
    return path


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV export (trials.csv, pareto.csv, ...) as dicts of strings."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def reports(trial_dir: Path) -> list[dict]:
    """A Ray trial's result.json lines (a line still being written is skipped)."""
    out = []
    try:
        text = (trial_dir / "result.json").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def reported_epochs(trial_dir: Path) -> list[int]:
    """The epochs a Ray trial reported, in order."""
    return [r["epoch"] for r in reports(trial_dir)]


# -- waiting and processes ----------------------------------------------------------------------
def wait_for(predicate, timeout: float = WAIT, every: float = 0.3) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


def run_module(module: str, *args: str, cwd: Path | None = None, timeout: float = WAIT,
               **kw) -> subprocess.CompletedProcess:
    """``python -m module args...`` to completion, output captured as text; never raises on
    a non-zero exit (the tests check ``returncode``)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False, **kw)


def start_driver(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """The search CLI in its own session and process group (so the driver and its local Ray
    can be SIGKILLed together); its output goes to ``log``."""
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "ssam_tune.run", *args], cwd=cwd, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of a driver started by :func:`start_driver`, if still running."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def session_pids(sid: int) -> list[int]:
    """Live processes of a session: a SIGKILLed driver's Ray workers (in their own process
    groups) outlive it until they notice that their raylet is gone."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def reap_session(sid: int, timeout: float = 60) -> None:
    """Wait until every process the killed driver started is gone (SIGKILL stragglers)."""
    if not wait_for(lambda: not session_pids(sid), timeout=timeout, every=0.5):
        for pid in session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert wait_for(lambda: not session_pids(sid), timeout=30), session_pids(sid)
