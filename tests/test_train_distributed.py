"""Data-parallel training on any device count (against one device), multi-host and resumable
training, and the default `nexvitad run` on 3 and 8 devices, each in fresh subprocesses with fake
CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N; tiny config).

Run as a script, this file is the worker those tests start: `python tests/test_train_distributed.py
{steps,train} ...`.

Compilation is most of what these runs cost (far more than the steps of the tiny config), so the
runs use `config.train.fast_compile` (XLA optimization level 0: faster compilation, slower steps)
and each test compiles as few programs as its property needs. No persistent compilation cache."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve()
STEPS = 6  # 3 epochs of 2 steps: phase 1, then two phase-2 epochs (pseudo-labels refreshed twice)


def _env(devices: int = 1, extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", NEXVITAD_FEATURE_CACHE="0")
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------------------------
# workers

def _config():
    from nexvitad_jax.configs import tiny

    config = tiny.get_config()
    config.train.epochs, config.train.steps_per_epoch, config.train.phase1_epochs = 3, 2, 1
    config.train.fast_compile = True
    config.train.feature_cache = os.environ.get("NEXVITAD_FEATURE_CACHE") == "1"
    return config


def worker_train(workdir: str, delay: float = 0.0) -> None:
    """train() on the synthetic set; the final trainable params and batch stats go to workdir/final.npz."""
    import jax
    from flax import nnx

    if os.environ.get("NEXVITAD_PROCESS_ID") is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ["NEXVITAD_COORDINATOR"], num_processes=2,
                                   process_id=int(os.environ["NEXVITAD_PROCESS_ID"]))
    from nexvitad_jax.data import open_dataset
    from nexvitad_jax.models.nexvitad import TRAINABLE
    from nexvitad_jax.train import train

    if delay:  # slow steps down so the test can kill the run between checkpoints
        import nexvitad_jax.train.loop as loop
        original = loop.Checkpoints.save

        def slow_save(self, *args, **kwargs):
            time.sleep(delay)
            return original(self, *args, **kwargs)

        loop.Checkpoints.save = slow_save
    dataset = open_dataset("synthetic", image_size=64)
    result = train(_config(), dataset, ["bottle", "cable"], ["hazelnut"], workdir, progress=False)
    trainable = nnx.to_flat_state(nnx.state(result.model, nnx.Any(TRAINABLE, nnx.BatchStat)))
    arrays = {"/".join(map(str, path)): np.asarray(jax.device_get(v.get_value() if hasattr(v, "get_value") else v))
              for path, v in trainable}
    name = f"final{os.environ.get('NEXVITAD_PROCESS_ID', '')}.npz"
    np.savez(Path(workdir) / name, **arrays)


def _flat_arrays(tree) -> dict[str, np.ndarray]:
    """The leaves of a pytree of (possibly multi-host, replicated) arrays, on the host, by path."""
    import jax

    from nexvitad_jax.train.checkpoints import path_names

    return {"/".join(path_names(path)): np.asarray(jax.device_get(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def worker_steps(out: str, device_counts: str) -> None:
    """Two phase-1 then two phase-2 steps of the tiny config on the first n devices, for each n of
    `device_counts` (e.g. "1,3,8"), from the same initial model and data, through TrainBatches
    (data order, layout, padding, the feature cache when NEXVITAD_FEATURE_CACHE=1), with fixed
    pseudo-labels (labelled and IGNORE pixels) so every loss term and head trains. The final
    trainable params and BatchNorm statistics, and the losses, go to `out`/steps{n}.npz."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nexvitad_jax.data import open_dataset
    from nexvitad_jax.models.build import build_model
    from nexvitad_jax.sharding import make_mesh
    from nexvitad_jax.train.batches import TrainBatches
    from nexvitad_jax.train.loop import load_training_data
    from nexvitad_jax.train.step import TrainStep

    config = _config()
    dataset = open_dataset("synthetic", image_size=64)
    source_data, target_images = load_training_data(dataset, ["bottle", "cable"], ["hazelnut"],
                                                     int(config.data.few_shot), int(config.seed))
    labels = np.random.default_rng(0).integers(-1, 2, target_images.shape[:4]).astype(np.int32)
    graphdef, initial = nnx.split(build_model(config, 2, 1))
    for count in map(int, device_counts.split(",")):
        model = nnx.merge(graphdef, jax.tree.map(jnp.array, initial))  # a copy: the steps donate their state
        trainer = TrainStep.from_config(config, model, make_mesh(jax.devices()[:count]), 8)
        state = trainer.init_state(0)
        batches = TrainBatches(config, source_data, target_images, trainer, state)
        losses = []
        for step, phase in enumerate((1, 1, 2, 2)):
            state, metrics = trainer(state, batches.batch(step, phase, labels), phase)
            losses.append(float(jax.device_get(metrics["loss"])))
        arrays = _flat_arrays({key: state[key] for key in ("trainable", "batch_stats")})
        np.savez(Path(out) / f"steps{count}.npz", losses=np.asarray(losses), **arrays)


# ------------------------------------------------------------------------------------------------
# tests

def _run(args, env, timeout=600):
    return subprocess.run([sys.executable, str(WORKER), *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, worker_id) -> dict[str, np.ndarray]:
    """The final state of an uninterrupted single-process run of the tiny config, made once for all
    xdist workers: the first to need it runs it under a file lock, the others wait and read it."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent  # the session's directory, above each worker's
    root = shared / "train_reference"
    with open(shared / "train_reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "final.npz").is_file():
            shutil.rmtree(root, ignore_errors=True)  # an earlier failed attempt: start afresh
            done = _run(["train", str(root / "work")], _env())
            assert done.returncode == 0, done.stderr[-4000:]
            (root / "work" / "final.npz").rename(root / "final.npz")
    return _load(root / "final.npz")


def _relative_differences(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    """Per array, |got - want| / |want| (Frobenius norms)."""
    assert got.keys() == want.keys()
    return {key: float(np.linalg.norm(got[key] - want[key]) / max(np.linalg.norm(want[key]), 1e-30)) for key in want}


@pytest.mark.parametrize("device_counts, feature_cache", [
    pytest.param("1,3", "0", id="3-devices"),
    pytest.param("1,3,8", "0", marks=pytest.mark.slow, id="3-and-8-devices"),
    pytest.param("1,3,8", "1", marks=pytest.mark.slow, id="3-and-8-devices-feature-cache")])
def test_any_device_count_trains_as_one_device(tmp_path, device_counts, feature_cache):
    """Steps of both phases on 3 (and 8) devices, where the batch (4 source, 2 + 2 target images;
    2 per class) divides over no device count but 1 and 2, equal the one-device steps: params and
    BatchNorm statistics to 1e-5 relative."""
    env = _env(devices=8, extra={"NEXVITAD_FEATURE_CACHE": feature_cache})
    done = _run(["steps", str(tmp_path), device_counts], env)
    assert done.returncode == 0, done.stderr[-4000:]
    reference = _load(tmp_path / "steps1.npz")
    for count in device_counts.split(",")[1:]:
        got = _load(tmp_path / f"steps{count}.npz")
        np.testing.assert_allclose(got.pop("losses"), reference["losses"], rtol=1e-5)
        differences = _relative_differences(got, {k: v for k, v in reference.items() if k != "losses"})
        assert any(key.startswith("batch_stats/") for key in differences)
        worst = max(differences, key=differences.get)
        print(f"{count} devices: worst relative difference {differences[worst]:.2e} ({worst})")
        assert differences[worst] <= 1e-5, (count, worst, differences[worst])


@pytest.mark.parametrize("devices", [3, pytest.param(8, marks=pytest.mark.slow)])
def test_default_run_on_any_device_count(tmp_path, devices):
    """`nexvitad run` with no settings (the demo config: 11 source classes x 2 images, 1 target
    class x 2) on 3 and 8 devices, which divide neither 2 nor 22: it trains, scores and reports,
    and says once that the batch is padded."""
    command = [sys.executable, "-m", "nexvitad_jax.cli", "run", "--workdir", str(tmp_path / "run"), "--no-progress"]
    done = subprocess.run(command, env=_env(devices=devices), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("the batch is padded to the device count") == 1, done.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert results["train_steps"] > 0 and np.isfinite(results["train_last_metrics"]["loss"])


def test_sigkill_and_resume_equals_uninterrupted(reference_run, tmp_path):
    reference = reference_run
    workdir = tmp_path / "work"
    env = _env()
    killed = subprocess.Popen([sys.executable, str(WORKER), "train", str(workdir), "1.0"], env=env, cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Kill mid phase 2 (epoch 1, after its first step): the pseudo-labels must come from the checkpoint.
    deadline = time.time() + 500
    while not (workdir / "checkpoints" / "3").is_dir():
        assert killed.poll() is None, f"the run ended before it could be killed: {killed.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint 3 within the time limit"
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (workdir / "final.npz").exists()
    assert str(STEPS) not in os.listdir(workdir / "checkpoints")
    resumed = _run(["train", str(workdir)], env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    final = _load(workdir / "final.npz")
    assert final.keys() == reference.keys()
    worst = max(float(np.max(np.abs(final[k] - reference[k]))) for k in final)
    assert worst <= 1e-6, worst
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-(STEPS - 3):] == list(range(4, STEPS + 1))  # the resumed run started after step 3


@pytest.mark.parametrize("feature_cache", [False, pytest.param(True, marks=pytest.mark.slow, id="feature-cache")])
def test_two_processes_equal_single_process(reference_run, tmp_path, feature_cache):
    """Two gloo processes of 3 devices each, each feeding half of every batch's rows (and, with the
    feature cache, half of every chunk of the cache): the 6 devices pad every batch (4 source
    images -> 6 rows, 8 -> 12 in phase 2), so process 1 feeds padding. They end with identical
    params equal to the single-process, single-device run's."""
    reference = reference_run
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    workdir = tmp_path / "work"
    processes = [subprocess.Popen([sys.executable, str(WORKER), "train", str(workdir)], cwd=REPO_ROOT,
                                  env=_env(devices=3, extra={"NEXVITAD_PROCESS_ID": str(i),
                                                  "NEXVITAD_COORDINATOR": f"localhost:{port}",
                                                  "NEXVITAD_FEATURE_CACHE": str(int(feature_cache))}),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-4000:]
    finals = [_load(workdir / f"final{i}.npz") for i in range(2)]
    for key in reference:
        np.testing.assert_array_equal(finals[0][key], finals[1][key])
    worst = max(float(np.max(np.abs(finals[0][k] - reference[k]))) for k in reference)
    assert worst <= 1e-5, worst


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "train":
        worker_train(rest[0], float(rest[1]) if len(rest) > 1 else 0.0)
    elif command == "steps":
        worker_steps(*rest)
    else:
        raise SystemExit(f"unknown worker command {command!r}")
