"""Interrupts: SIGINT and SIGTERM at any moment end a command with 130 / 143 and one line, never a
crash (no traceback, no segfault), with no temporary file left and the last checkpoint restorable;
an interrupted `nexvitad run` resumes to the results of an uninterrupted one (slow)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from nexvitad_jax import signals
from nexvitad_jax.train.checkpoints import Checkpoints
from benchmarks.faults import largest_difference

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
# A command that does what a run does between signals: device computations, checkpoints and atomic
# writes, in a loop (started through the real `nexvitad` entry, cli.main).
# SIGINT is set as a terminal's foreground process has it (pytest run as a shell's background job
# would pass on an ignored SIGINT, which the command respects).
ENTRY = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from nexvitad_jax import cli
{commands}
sys.argv = ["nexvitad", *sys.argv[1:]]
sys.exit(cli.main())
"""
DRIVER = ENTRY.format(commands='cli.COMMANDS["work"] = ("tests.test_signals:busy_work", "")')


def _state(step: int) -> dict:
    return {"weights": jnp.arange(50_000, dtype=jnp.float32) * step, "step": jnp.asarray(step, jnp.int32)}


def busy_work(argv: list[str]) -> int:
    """Checkpoints every step and a JSON note, for up to a minute (the test interrupts it)."""
    import jax

    from nexvitad_jax.io import atomic_write
    from nexvitad_jax.lock import hold_workdir

    workdir = Path(argv[0])
    hold_workdir(workdir)  # released on the way out, interrupted or not
    checkpoints = Checkpoints(workdir / "checkpoints", every_steps=1, keep=2)
    update = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((256, 256))
    try:
        for step in range(1, 10_000):
            update(x * step).block_until_ready()
            checkpoints.save(step, _state(step), jnp.zeros((2, 4), jnp.int32), {"step": step})
            atomic_write(workdir / "note.json", json.dumps({"step": step, "padding": "x" * 100_000}))
            if step == 2:
                print("ready", flush=True)
    finally:
        checkpoints.close()
    return 0


def _interrupt(workdir: Path, signum: int, delay: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", DRIVER, "work", str(workdir)], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready", process.communicate()[1][-3000:]
    time.sleep(delay)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def leftovers(directory: Path) -> list[str]:
    """Temporary files and directories a write left behind."""
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*")
                  if ".tmp" in path.name or "orbax-checkpoint-tmp" in path.name)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_work_exits_cleanly_and_keeps_the_last_checkpoint(tmp_path, signum):
    delay = random.Random(int(signum)).uniform(0.0, 1.0)  # somewhere in the loop (each step ~0.1 s)
    done = _interrupt(tmp_path, signum, delay)
    assert done.returncode == EXPECTED_STATUS[signum], done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"nexvitad work: interrupted ({signal.Signals(signum).name}); run the same command again "
                     "to resume"], done.stderr[-3000:]
    assert leftovers(tmp_path) == []
    assert not (tmp_path / ".nexvitad.lock").exists()
    checkpoints = Checkpoints(tmp_path / "checkpoints", every_steps=1)
    step = checkpoints.latest_step()
    state, _, metadata = checkpoints.restore(step, _state(0), jnp.zeros((2, 4), jnp.int32))
    checkpoints.close()
    assert metadata == {"step": step} and int(state["step"]) == step
    np.testing.assert_array_equal(np.asarray(state["weights"]), np.arange(50_000, dtype=np.float32) * step)
    assert json.loads((tmp_path / "note.json").read_text())["step"] >= step - 1


def test_deferred_holds_a_signal_until_the_block_ends():
    signals.install()
    try:
        finished = []
        with pytest.raises(signals.Interrupted) as raised:
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler would have run here
                finished.append(True)
        assert finished == [True] and raised.value.signum == signal.SIGTERM
        assert signals.exit_status(raised.value) == 143 and signals.exit_status(KeyboardInterrupt()) == 130
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ----------------------------------------------------------------------------- a whole run (slow)


def _run_command(workdir: Path) -> list[str]:
    return [sys.executable, "-c", ENTRY.format(commands=""), "run", "--config", "tiny", "--workdir", str(workdir),
            "--no-progress"]


def _environment(cache: Path) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT), "NEXVITAD_CACHE": str(cache / "data"),
            "JAX_COMPILATION_CACHE_DIR": str(cache / "xla"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def per_class(workdir: Path) -> dict:
    return json.loads((workdir / "metrics.json").read_text())["per_class"]


@pytest.mark.slow
def test_signals_at_random_moments_of_a_run_then_resume_equal(tmp_path):
    """SIGINT/SIGTERM at random moments of `nexvitad run --config tiny` (training, bank, scoring,
    report); every exit status is 130/143 and every resumed run ends with the uninterrupted metrics."""
    env = _environment(tmp_path / "cache")
    began = time.perf_counter()
    subprocess.run(_run_command(tmp_path / "full"), env=env, check=True, capture_output=True)
    duration = time.perf_counter() - began
    rng = random.Random(0)
    for trial in range(int(os.environ.get("NEXVITAD_SIGNAL_TRIALS", "6"))):
        workdir = tmp_path / f"trial{trial}"
        signum = rng.choice([signal.SIGINT, signal.SIGTERM])
        for attempt in range(10):  # interrupted again and again, then left to finish
            process = subprocess.Popen(_run_command(workdir), env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            try:
                process.communicate(timeout=rng.uniform(2.0, duration) if attempt < 2 else None)
            except subprocess.TimeoutExpired:
                process.send_signal(signum)
                process.communicate(timeout=300)
                assert process.returncode == EXPECTED_STATUS[signum], (trial, attempt, process.returncode)
                continue
            assert process.returncode == 0, (trial, attempt, process.returncode)
            break
        assert leftovers(workdir) == [], trial
        assert largest_difference(per_class(workdir), per_class(tmp_path / "full")) <= 1e-5, trial
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
