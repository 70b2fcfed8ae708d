"""A run's locks go with its process, not with the children it forked (decoding workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipaudit.errors import OutputError
from clipaudit.extraction.locking import _worker_slot
from clipaudit.staging import repair

REPO_DPATH = Path(__file__).resolve().parents[1]

# Takes the lock, forks a child that outlives it (as a DataLoader worker does), prints the
# child's pid and is killed with SIGKILL.
_HOLD_FORK_DIE = """
import os, signal, sys, time
from pathlib import Path
kind, path = sys.argv[1], Path(sys.argv[2])
if kind == "extract":
    from clipaudit.extraction.locking import _worker_slot
    held = _worker_slot(path, 0, 1)
else:
    from clipaudit.staging import staged_folder
    held = staged_folder(path, command="audit")
with held:
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _orphan_after_killed_holder(kind: str, path: Path) -> int:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_FORK_DIE, kind, str(path)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_DPATH)})
    child = int(proc.stdout.readline())
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    os.kill(child, 0)  # the forked child still runs
    return child


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.parametrize("kind", ["extract", "audit"])
def test_a_killed_runs_forked_child_does_not_hold_its_lock(kind, tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    child = _orphan_after_killed_holder(kind, path)
    try:
        if kind == "extract":
            with _worker_slot(path, 0, 1):  # would raise "another clipaudit extract"
                pass
        else:
            repair(path)  # would raise "another clipaudit run" and keep the leftovers
            assert [p.name for p in tmp_path.iterdir()] == ["out"]
    finally:
        os.kill(child, signal.SIGKILL)
        time.sleep(0.05)


def test_a_live_holder_still_refuses_a_second_one(tmp_path):
    with _worker_slot(tmp_path, 0, 1), pytest.raises(OutputError, match="another clipaudit"):
        with _worker_slot(tmp_path, 0, 1):
            pass
