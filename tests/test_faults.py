"""Clean failures: an OSError on the workdir or the cache (no space, read-only, permission denied)
ends in one line naming the path and the cause, exit status 1, no temporary file left, and the
previous file or checkpoint as it was; a rerun after the fault ends as an uninterrupted run (slow).

Faults are injected at each write point (ENOSPC, EROFS), and made real on a small tmpfs where the
test may mount one (root)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from nexvitad_jax import cli
from nexvitad_jax.io import WriteFailed, atomic_savez, atomic_write
from benchmarks.faults import largest_difference
from nexvitad_jax.train.checkpoints import Checkpoints
from tests.conftest import MVTEC_REDUCED

REPO_ROOT = Path(__file__).resolve().parents[1]
FAULTS = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS}


def leftovers(directory: Path) -> list[str]:
    """Temporary files and directories a write left behind."""
    return sorted(str(path.relative_to(directory)) for path in Path(directory).rglob("*")
                  if ".tmp" in path.name or "orbax-checkpoint-tmp" in path.name)


def _failing_after_a_partial_write(code: int):
    """A writer `write(target, ...)` that writes part of its file, then fails with `code` (as a full
    disk does)."""
    def failing(target, *args, **kwargs):
        Path(target).write_bytes(b"part")
        raise OSError(code, os.strerror(code))
    return failing


@pytest.mark.parametrize("code", FAULTS.values(), ids=FAULTS.keys())
@pytest.mark.parametrize("writer", ["text", "npz", "rename"])
def test_a_failed_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, code, writer):
    path = tmp_path / "out" / ("a.json" if writer != "npz" else "a.npz")
    path.parent.mkdir()
    path.write_bytes(b"previous")
    if writer == "text":
        monkeypatch.setattr(Path, "write_text", lambda self, text: _failing_after_a_partial_write(code)(self))
    elif writer == "npz":
        monkeypatch.setattr(np, "savez", _failing_after_a_partial_write(code))
    else:
        monkeypatch.setattr(os, "replace", lambda source, target: (_ for _ in ()).throw(
            OSError(code, os.strerror(code), str(source), str(target))))
    with pytest.raises(WriteFailed) as failed:
        (atomic_savez(path, x=np.zeros(3)) if writer == "npz" else atomic_write(path, "new"))
    assert (failed.value.errno, failed.value.filename, failed.value.strerror) == (code, str(path), os.strerror(code))
    assert path.read_bytes() == b"previous" and leftovers(tmp_path) == []


def _boom(argv):
    raise WriteFailed(errno.ENOSPC, os.strerror(errno.ENOSPC), argv[0])


def _read_only(argv):
    Path(argv[0]).mkdir()  # an OSError of the library's own code, not one of nexvitad_jax.io's writes


def test_the_command_line_says_an_os_error_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "boom", ("tests.test_faults:_boom", ""))
    assert cli.main(["boom", str(tmp_path / "runs/x/train/checkpoints/4")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"nexvitad boom: error: cannot write {tmp_path}/runs/x/train/checkpoints/4: No space left on device"]
    monkeypatch.setitem(cli.COMMANDS, "mkdir", ("tests.test_faults:_read_only", ""))
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))))
    assert cli.main(["mkdir", str(tmp_path / "w")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"nexvitad mkdir: error: cannot write {tmp_path}/w: Read-only file system"]


# ----------------------------------------------------------------------------- checkpoints


def _weights(step: int, size: int) -> np.ndarray:
    return np.random.default_rng(step).normal(size=size).astype(np.float32)  # incompressible


def _state(step: int, size: int = 1000) -> dict:
    return {"weights": jnp.asarray(_weights(step, size)), "step": jnp.asarray(step, jnp.int32)}


def _restores(directory: Path, step: int, size: int = 1000) -> None:
    checkpoints = Checkpoints(directory, every_steps=1)
    assert checkpoints.latest_step() == step
    state, labels, metadata = checkpoints.restore(step, _state(0, size), jnp.zeros((2,), jnp.int32))
    checkpoints.close()
    assert metadata == {"step": step} and int(state["step"]) == step
    np.testing.assert_array_equal(np.asarray(state["weights"]), _weights(step, size))


ORBAX_FULL_DISK = ('RESOURCE_EXHAUSTED: Error writing "weights/0" in OCDBT database at local file "{tmp}/state/'
                   'ocdbt.process_0/": Failed writing: "{tmp}/state/ocdbt.process_0/d/0e4a": Failed to write 248049 '
                   "bytes to file 15: No space left on device [os_error_code='28']")


def test_a_failed_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The failure as orbax reports a full disk (a ValueError from its writer, the step's temporary
    directory half-written): one WriteFailed naming the step, no temporary directory left."""
    checkpoints = Checkpoints(tmp_path, every_steps=1)
    checkpoints.save(1, _state(1), jnp.zeros((2,), jnp.int32), {"step": 1})
    real_save = type(checkpoints.manager).save

    def full_disk(manager, step, *args, **kwargs):
        tmp = tmp_path / f"{step}.orbax-checkpoint-tmp-1234"
        (tmp / "state").mkdir(parents=True)
        (tmp / "state" / "part").write_bytes(b"x" * 100)
        raise ValueError(ORBAX_FULL_DISK.format(tmp=tmp))

    monkeypatch.setattr(type(checkpoints.manager), "save", full_disk)
    with pytest.raises(WriteFailed) as failed:
        checkpoints.save(2, _state(2), jnp.zeros((2,), jnp.int32), {"step": 2})
    assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, str(tmp_path / "2"))
    monkeypatch.setattr(type(checkpoints.manager), "save", real_save)
    checkpoints.close()
    assert leftovers(tmp_path) == []
    _restores(tmp_path, 1)


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str):
    """A tmpfs of `size` mounted on `directory`, or a skip saying why it cannot be (not root)."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}); the injected "
                    "faults above are the test")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def test_a_real_full_and_read_only_disk(tmp_path, capsys):
    """On a 2 MB tmpfs: a checkpoint that does not fit (ENOSPC), then the disk read-only (EROFS):
    each save fails in one WriteFailed, the last good checkpoint restores, nothing temporary stays;
    `nexvitad run` on the read-only disk ends in one line with status 1."""
    size = 200_000  # 800 kB a checkpoint: the third does not fit beside the first two
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        checkpoints = Checkpoints(disk / "ck", every_steps=1, keep=3)
        for step in (1, 2):
            checkpoints.save(step, _state(step, size), jnp.zeros((2,), jnp.int32), {"step": step})
        with pytest.raises(WriteFailed) as failed:
            checkpoints.save(3, _state(3, size), jnp.zeros((2,), jnp.int32), {"step": 3})
        assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, str(disk / "ck" / "3"))
        checkpoints.close()
        assert leftovers(disk) == []
        _restores(disk / "ck", 2, size)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        checkpoints = Checkpoints(disk / "ck", every_steps=1)
        with pytest.raises(WriteFailed) as failed:
            checkpoints.save(3, _state(3, size), jnp.zeros((2,), jnp.int32), {"step": 3})
        assert failed.value.errno == errno.EROFS
        checkpoints.close()
        _restores(disk / "ck", 2, size)
        with pytest.raises(WriteFailed, match="Read-only file system"):
            atomic_write(disk / "metrics.json", "{}")
        capsys.readouterr()
        assert cli.main(["run", "--config", "tiny", "--workdir", str(disk / "run"), "--no-progress"]) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert lines == [f"nexvitad run: error: cannot write {disk / 'run'}: Read-only file system"]


# ----------------------------------------------------------------------------- the dataset cache


@pytest.mark.parametrize("code", FAULTS.values(), ids=FAULTS.keys())
def test_a_failed_cache_write_names_the_cache_file(tmp_path, monkeypatch, code):
    from nexvitad_jax.data import open_dataset

    dataset = open_dataset(MVTEC_REDUCED, image_size=32, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(np, "savez", _failing_after_a_partial_write(code))
    with pytest.raises(WriteFailed) as failed:
        dataset.load("hazelnut", "train")
    assert failed.value.filename == str(dataset.cache_path("hazelnut", "train")) and failed.value.errno == code
    assert "set NEXVITAD_CACHE to a writable folder" in failed.value.strerror
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    assert len(dataset.load("hazelnut", "train")) > 0  # the next try decodes and caches


# ----------------------------------------------------------------------------- whole runs (slow)

# `nexvitad run --config tiny` with one write point failing (ENOSPC) the first time it is written:
# argv = POINT WORKDIR.
FAULT_DRIVER = r"""
import errno, os, sys
from pathlib import Path
point, workdir = sys.argv[1], sys.argv[2]
fired = []

def fire(where=None):
    if not fired:
        fired.append(where)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(where)] if where else []))

NAMES = {"run.json": "run.json", "classes": ".json", "metrics.json": "metrics.json", "maps": ".npz",
         "cache": "_train.npz"}
if point in NAMES:  # every atomic write renames its temporary file into place
    real_replace = os.replace
    def replace(source, target):
        if str(target).endswith(NAMES[point]) and (point != "classes" or "/classes/" in str(target)) and (
                point != "maps" or "/maps/" in str(target)) and (point != "cache" or "/maps/" not in str(target)):
            fire(target)
        return real_replace(source, target)
    os.replace = replace
elif point == "checkpoint":
    import orbax.checkpoint as ocp
    real_save = ocp.CheckpointManager.save
    def save(manager, step, *args, **kwargs):
        if step >= 2 and not fired:
            fired.append(step)
            raise ValueError(f"RESOURCE_EXHAUSTED: Error writing: No space left on device [os_error_code='28']")
        return real_save(manager, step, *args, **kwargs)
    ocp.CheckpointManager.save = save
elif point == "metrics.jsonl":
    import nexvitad_jax.train.loop as loop
    class Full:
        def __init__(self, path, mode):
            self.file, self.lines = open(path, mode), 0
        def write(self, text):
            self.lines += 1
            if self.lines == 2:
                fire()  # as file.write fails: no file name
            return self.file.write(text)
        def __getattr__(self, name):
            return getattr(self.file, name)
    loop.open = Full
elif point == "heatmaps":
    from PIL import Image
    real = Image.Image.save
    def save(image, path, *args, **kwargs):
        if str(path).endswith(".png") and "/heatmaps/" in str(path):
            Path(path).write_bytes(b"partial")
            fire(path)
        return real(image, path, *args, **kwargs)
    Image.Image.save = save
from nexvitad_jax import cli
sys.argv = ["nexvitad", "run", "--data", sys.argv[3], "--split", "1/1", "--config", "tiny", "--workdir", workdir,
            "--no-progress"]
sys.exit(cli.main())
"""
WRITE_POINTS = ["run.json", "checkpoint", "metrics.jsonl", "cache", "maps", "classes", "metrics.json", "heatmaps"]


def _environment(data_cache: Path, xla_cache: Path) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT), "NEXVITAD_CACHE": str(data_cache),
            "JAX_COMPILATION_CACHE_DIR": str(xla_cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _run(point: str, workdir: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAULT_DRIVER, point, str(workdir), str(MVTEC_REDUCED)], env=env,
                          capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_a_fault_at_each_write_point_then_a_rerun_ends_as_an_uninterrupted_run(tmp_path):
    clean = _run("none", tmp_path / "clean", _environment(tmp_path / "data", tmp_path / "xla"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    expected = json.loads((tmp_path / "clean" / "metrics.json").read_text())["per_class"]
    for point in WRITE_POINTS:
        data_cache = tmp_path / ("data-cold" if point == "cache" else "data")  # the cache point decodes afresh
        env = _environment(data_cache, tmp_path / "xla")
        faulted = _run(point, tmp_path / point, env)
        errors = [line for line in faulted.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert faulted.returncode == 1, (point, faulted.stderr[-3000:])
        assert len(errors) == 1 and "No space left on device" in errors[0], (point, errors)
        assert "cannot write /" in errors[0], (point, errors)
        assert leftovers(tmp_path / point) == [] and leftovers(data_cache) == [], point
        rerun = _run("none", tmp_path / point, env)
        assert rerun.returncode == 0, (point, rerun.stderr[-3000:])
        got = json.loads((tmp_path / point / "metrics.json").read_text())["per_class"]
        assert largest_difference(got, expected) <= 1e-5, point
