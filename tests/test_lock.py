"""The workdir lock: a second run on a busy workdir is refused naming the holder (exit status 2), a
lock whose process died is taken over with a notice, and the experiment runner's runs lock alike."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nexvitad_jax import cli
from nexvitad_jax.config import load_config
from nexvitad_jax.lock import LOCK_NAME, WorkdirBusy, WorkdirLock, hold_workdir, release_workdir, workdir_lock

REPO_ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from nexvitad_jax.lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/work's lock (killed with SIGKILL at the end)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "work")], env=env,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_busy_workdir_names_its_holder(tmp_path, holder):
    with pytest.raises(WorkdirBusy) as refused:
        WorkdirLock(tmp_path / "work").acquire()
    message = str(refused.value)
    assert f"process {holder.pid} on host {socket.gethostname()} (started 20" in message
    assert str(tmp_path / "work") in message and isinstance(refused.value, ValueError)


def test_nexvitad_run_on_a_busy_workdir_exits_2_naming_the_holder(tmp_path, holder, capsys):
    status = cli.main(["run", "--config", "tiny", "--workdir", str(tmp_path / "work"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"is in use by process {holder.pid}" in err and "Traceback" not in err
    assert not (tmp_path / "work" / "run.json").exists()  # refused before anything was written


def test_a_dead_holders_lock_is_taken_over_with_a_notice(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    note = json.loads((tmp_path / "work" / LOCK_NAME).read_text())  # the dead holder's note stays
    assert note["pid"] == holder.pid
    notices = []
    with workdir_lock(tmp_path / "work", notice=notices.append):
        assert len(notices) == 1 and f"process {holder.pid}" in notices[0] and "taking over" in notices[0]
        assert json.loads((tmp_path / "work" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "work" / LOCK_NAME).exists()  # a clean release leaves nothing


def test_a_process_takes_its_own_lock_once(tmp_path):
    first = hold_workdir(tmp_path)
    assert hold_workdir(tmp_path) is first
    with workdir_lock(tmp_path):  # held already: still held after the block
        pass
    assert first.held
    release_workdir(tmp_path)
    assert not first.held and not (tmp_path / LOCK_NAME).exists()
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirBusy):  # another descriptor is another holder, even in this process
            WorkdirLock(tmp_path).acquire()


def test_the_experiment_runners_runs_lock_their_folder(tmp_path):
    from experiments.runner import Experiment, Run, run_experiment

    calls = []

    def execute(workdir: Path, progress: bool) -> dict:
        calls.append(workdir)
        return {"value": 1}

    experiment = Experiment("toy", "toy", [Run("a", {"i": 0}, load_config("tiny"), execute)],
                            aggregate=lambda records: ({"n": len(records)}, ""))
    with WorkdirLock(tmp_path / "out" / "runs" / "a", what="experiment run"):
        with pytest.raises(WorkdirBusy, match=f"experiment run .* is in use by process {os.getpid()}"):
            run_experiment(experiment, tmp_path / "out", log=lambda _: None)
    assert calls == []
    run_experiment(experiment, tmp_path / "out", log=lambda _: None)
    assert calls == [tmp_path / "out" / "runs" / "a" / "work"]
    assert not (tmp_path / "out" / "runs" / "a" / LOCK_NAME).exists()
