"""Data-parallel, multi-host and resumable training, each in fresh subprocesses (small, tiny config).

Run as a script, this file is the worker those tests start: `python tests/test_train_distributed.py
{shard,train} ...`."""

from __future__ import annotations

import json
import os
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


def _env(tmp_cache: Path, devices: int = 1, extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               # One compilation cache for the runs of a test: the resumed run reuses what the killed one compiled.
               JAX_COMPILATION_CACHE_DIR=str(tmp_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------------------------
# workers

def _config():
    from experiments.configs import tiny

    config = tiny.get_config()
    config.epochs, config.steps_per_epoch, config.phase1_epochs = 3, 2, 1
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


def worker_shard(out: str) -> None:
    """One step of each phase on an 8-device mesh and on 1 device, same global batch."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nexvitad_jax.train.loop import build_model
    from nexvitad_jax.train.step import TrainStep, make_mesh, make_optimizer, batch_sharding

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 8, 64, 64), bool)
    masks[:, :, 20:40, 10:30] = rng.uniform(size=(2, 8, 1, 1)) < 0.5
    labels = rng.integers(-1, 2, size=(1, 8, 64, 64)).astype(np.int32)
    batch = {"source_images": rng.integers(0, 256, (2, 8, 64, 64, 3), dtype=np.uint8), "source_masks": masks,
             "target_images": rng.integers(0, 256, (1, 8, 64, 64, 3), dtype=np.uint8), "target_labels": labels}
    results = {}
    for name, devices in (("mesh8", jax.devices()), ("single", jax.devices()[:1])):
        mesh = make_mesh(devices)
        trainer = TrainStep(build_model(_config(), 2, 1), make_optimizer(1e-3, 1, 10), mesh)
        state = trainer.init_state(0)
        placed = jax.device_put(batch, batch_sharding(mesh))
        state, metrics1 = trainer(state, placed, 1)
        state, metrics2 = trainer(state, placed, 2)
        results[name] = (float(metrics1["loss"]), float(metrics2["loss"]),
                         jax.device_get({"trainable": state["trainable"], "batch_stats": state["batch_stats"]}),
                         str(placed["source_images"].sharding.spec))
    a, b = results["mesh8"], results["single"]
    leaves_a, leaves_b = jax.tree.leaves(a[2]), jax.tree.leaves(b[2])
    stats_a, stats_b = jax.tree.leaves(a[2]["batch_stats"]), jax.tree.leaves(b[2]["batch_stats"])
    report = {"loss_diff": max(abs(a[0] - b[0]), abs(a[1] - b[1])), "losses": [a[0], a[1]],
              "param_max_abs_diff": max(float(np.max(np.abs(x - y))) for x, y in zip(leaves_a, leaves_b)),
              "batch_stats_max_abs_diff": max(float(np.max(np.abs(x - y))) for x, y in zip(stats_a, stats_b)),
              "param_max_change": max(float(np.max(np.abs(x))) for x in jax.tree.leaves(a[2]["trainable"])),
              "spec": a[3]}
    Path(out).write_text(json.dumps(report))


# ------------------------------------------------------------------------------------------------
# tests

def _run(args, env, timeout=600):
    return subprocess.run([sys.executable, str(WORKER), *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted single-process run of the tiny config."""
    root = tmp_path_factory.mktemp("reference")
    done = _run(["train", str(root / "work")], _env(root / "cache"))
    assert done.returncode == 0, done.stderr[-4000:]
    return root, _load(root / "work" / "final.npz")


def test_sharded_step_equals_single_device(tmp_path):
    done = _run(["shard", str(tmp_path / "report.json")], _env(tmp_path / "cache", devices=8))
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["spec"] in ("PartitionSpec(None, 'data')", "P(None, 'data')")
    assert report["loss_diff"] <= 1e-5 * max(1.0, abs(report["losses"][1]))
    assert report["param_max_abs_diff"] <= 1e-5
    assert report["batch_stats_max_abs_diff"] <= 1e-5


def test_sigkill_and_resume_equals_uninterrupted(reference_run, tmp_path):
    root, reference = reference_run
    workdir = tmp_path / "work"
    env = _env(root / "cache")
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


def test_two_processes_equal_single_process(reference_run, tmp_path):
    root, reference = reference_run
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    workdir = tmp_path / "work"
    processes = [subprocess.Popen([sys.executable, str(WORKER), "train", str(workdir)], cwd=REPO_ROOT,
                                  env=_env(tmp_path / "cache", extra={"NEXVITAD_PROCESS_ID": str(i),
                                                                      "NEXVITAD_COORDINATOR": f"localhost:{port}"}),
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
        worker_shard(rest[0])
    else:
        raise SystemExit(f"unknown worker command {command!r}")
