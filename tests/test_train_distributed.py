"""Data-parallel, multi-host and resumable training, each in fresh subprocesses (small, tiny config).

Run as a script, this file is the worker those tests start: `python tests/test_train_distributed.py
{shard,train} ...`.

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


def worker_shard(out: str, phases: str = "2", fast_compile: str = "1") -> None:
    """Steps of `phases` (e.g. "2" or "1,2") on an 8-device mesh and on 1 device, same global batch
    and initial state. Phase 2 runs every loss term (phase 1's are a subset), so it alone reaches
    every head and every BatchNorm."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nexvitad_jax.compilation import fast_compile_options
    from nexvitad_jax.models.build import build_model
    from nexvitad_jax.sharding import batch_sharding, make_mesh
    from nexvitad_jax.train.step import TrainStep, make_optimizer

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 8, 64, 64), bool)
    masks[:, :, 20:40, 10:30] = rng.uniform(size=(2, 8, 1, 1)) < 0.5
    labels = rng.integers(-1, 2, size=(1, 8, 64, 64)).astype(np.int32)
    batch = {"source_images": rng.integers(0, 256, (2, 8, 64, 64, 3), dtype=np.uint8), "source_masks": masks,
             "target_images": rng.integers(0, 256, (1, 8, 64, 64, 3), dtype=np.uint8), "target_labels": labels}
    graphdef, initial = nnx.split(build_model(_config(), 2, 1))
    options = fast_compile_options() if fast_compile == "1" else None
    phases = [int(p) for p in phases.split(",")]
    results = {}
    for name, devices in (("mesh8", jax.devices()), ("single", jax.devices()[:1])):
        mesh = make_mesh(devices)
        model = nnx.merge(graphdef, jax.tree.map(jnp.array, initial))  # a copy: the steps donate their state
        trainer = TrainStep(model, make_optimizer(1e-3, 1, 10), mesh, compiler_options=options)
        state = trainer.init_state(0)
        placed = jax.device_put(batch, batch_sharding(mesh))
        losses = []
        for phase in [*phases, phases[-1]]:  # the last phase twice: a step from a stepped state
            state, metrics = trainer(state, placed, phase)
            losses.append(float(metrics["loss"]))
        results[name] = (losses, jax.device_get({"trainable": state["trainable"], "batch_stats": state["batch_stats"]}),
                         str(placed["source_images"].sharding.spec))
    a, b = results["mesh8"], results["single"]
    leaves_a, leaves_b = jax.tree.leaves(a[1]), jax.tree.leaves(b[1])
    stats_a, stats_b = jax.tree.leaves(a[1]["batch_stats"]), jax.tree.leaves(b[1]["batch_stats"])
    report = {"loss_diff": max(abs(x - y) for x, y in zip(a[0], b[0])), "losses": a[0],
              "param_max_abs_diff": max(float(np.max(np.abs(x - y))) for x, y in zip(leaves_a, leaves_b)),
              "batch_stats_max_abs_diff": max(float(np.max(np.abs(x - y))) for x, y in zip(stats_a, stats_b)),
              "batch_stats_count": len(stats_a), "spec": a[2]}
    Path(out).write_text(json.dumps(report))


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


@pytest.mark.parametrize("phases, fast_compile", [
    pytest.param("2", "1", id="phase2-fast-compile"),
    pytest.param("1,2", "0", marks=pytest.mark.slow, id="both-phases-full-compile")])
def test_sharded_step_equals_single_device(tmp_path, phases, fast_compile):
    done = _run(["shard", str(tmp_path / "report.json"), phases, fast_compile], _env(devices=8))
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["spec"] in ("PartitionSpec(None, 'data')", "P(None, 'data')")
    assert report["loss_diff"] <= 1e-5 * max(1.0, *map(abs, report["losses"]))
    assert report["param_max_abs_diff"] <= 1e-5
    assert report["batch_stats_count"] > 0 and report["batch_stats_max_abs_diff"] <= 1e-5


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
    """Two gloo processes, each feeding half of every batch (and, with the feature cache, half of
    every chunk of the cache), end with identical params equal to the single-process run's."""
    reference = reference_run
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    workdir = tmp_path / "work"
    processes = [subprocess.Popen([sys.executable, str(WORKER), "train", str(workdir)], cwd=REPO_ROOT,
                                  env=_env(extra={"NEXVITAD_PROCESS_ID": str(i),
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
    elif command == "shard":
        worker_shard(*rest)
    else:
        raise SystemExit(f"unknown worker command {command!r}")
