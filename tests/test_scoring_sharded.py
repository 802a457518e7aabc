"""Scoring spread over every device of every host equals scoring on one device: the main job's
`score_class` (memory bank and decoder), the cluster sweep's `sweep_class` and the detector's
features, on meshes of 1, 3 and 8 fake CPU devices; two gloo processes against one process.

Run as a script, this file is the worker those tests start: `python tests/test_scoring_sharded.py
{devices,processes} ...`. The references are the one-device results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve()
CATEGORY = "bottle"
# One memory-bank layer: one K-means program to compile per bank size.
OVERRIDES = ["bank.layers=(3,)"]


def _env(devices: int, extra: dict | None = None) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(extra or {}))


def _run(args, env, timeout=900):
    return subprocess.run([sys.executable, str(WORKER), *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _normal_images(count: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.clip(0.4 + 0.05 * rng.normal(size=(count, 64, 64, 3)), 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# workers


def worker_devices(out: str, counts: str) -> None:
    """For each N of `counts`, on a mesh of the first N devices: the main job's scoring of one class
    (maps, image scores, metrics of both inference paths), the cluster sweep's metrics at the
    config's K, and the features of 6 normal images (their sharding). Arrays to OUT.npz, the rest to
    OUT.json."""
    import jax

    from experiments.cluster_sweep import sweep_class
    from nexvitad_jax.config import load_config
    from nexvitad_jax.data import open_dataset
    from nexvitad_jax.inference import AnomalyDetector
    from nexvitad_jax.models.build import build_model
    from nexvitad_jax.run import score_class, target_context
    from nexvitad_jax.sharding import make_mesh

    config = load_config("tiny", OVERRIDES)
    dataset = open_dataset("synthetic", image_size=int(config.data.image_size))
    model = build_model(config, 1, 1)
    arrays, report = {}, {}
    for count in map(int, counts.split(",")):
        mesh = make_mesh(jax.devices()[:count])
        context = target_context(config, dataset, 0, ("memory_bank", "decoder"), model, "test", False,
                                 lambda message: None, mesh)
        record, maps, _ = score_class(context, CATEGORY, 0)
        sweep = sweep_class(context.extractor, config, dataset, CATEGORY, 0, [int(config.bank.k)])
        features = AnomalyDetector(context.extractor, batch_size=int(config.eval.batch_size), mesh=mesh).extract(
            _normal_images(6))
        arrays |= {f"{count}/{name}": value for name, value in maps.items()}
        arrays[f"{count}/features"] = np.asarray(jax.device_get(features[0]))
        report[count] = {"metrics": record["metrics"], "sweep": sweep["per_k"][str(config.bank.k)],
                         "features_spec": str(features[0].sharding.spec),
                         "features_devices": len(features[0].sharding.device_set)}
    np.savez(f"{out}.npz", **arrays)
    Path(f"{out}.json").write_text(json.dumps(report))


def worker_processes(out: str) -> None:
    """One of two gloo processes with 2 devices each: the main job's scoring of one class over the
    4 devices (each process feeds its share of every batch); this process's gathered maps to
    OUT/mapsPROCESS.npz, the class's outputs to OUT/workdirPROCESS (written by process 0 only)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["NEXVITAD_COORDINATOR"], num_processes=2,
                               process_id=int(os.environ["NEXVITAD_PROCESS_ID"]))
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    maps = _score_main_job(jax.devices(), Path(out) / f"workdir{jax.process_index()}")
    np.savez(Path(out) / f"maps{jax.process_index()}.npz", **maps)


def _score_main_job(devices, workdir: Path) -> dict[str, np.ndarray]:
    """`score_class` of CATEGORY on a mesh of `devices`, outputs written to `workdir`; the maps."""
    from nexvitad_jax.config import load_config
    from nexvitad_jax.data import open_dataset
    from nexvitad_jax.models.build import build_model
    from nexvitad_jax.run import score_class, target_context, write_class_outputs
    from nexvitad_jax.sharding import make_mesh

    config = load_config("tiny", OVERRIDES)
    dataset = open_dataset("synthetic", image_size=int(config.data.image_size))
    methods = ("memory_bank", "decoder")
    context = target_context(config, dataset, 0, methods, build_model(config, 1, 1), "test", False,
                             lambda message: None, make_mesh(devices))
    record, maps, test = score_class(context, CATEGORY, 0)
    write_class_outputs(workdir, CATEGORY, record, maps, test, methods)
    return maps


# ------------------------------------------------------------------------------------------------
# tests


def _max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _check_against_one_device(arrays, report, count: int) -> dict[str, float]:
    """The maps, scores and metrics of `count` devices against one device's; returns the diffs."""
    diffs = {}
    for name in ("memory_bank", "memory_bank_image_scores", "decoder", "decoder_image_scores"):
        reference = arrays[f"1/{name}"]
        assert arrays[f"{count}/{name}"].shape == reference.shape
        diffs[name] = _max_abs_diff(arrays[f"{count}/{name}"], reference)
        # K-means over sharded features sums in another order: float32 rounding, relative to the maps' scale.
        assert diffs[name] <= 2e-5 * max(1.0, float(np.max(np.abs(reference)))), (name, diffs[name])
    diffs["features"] = _max_abs_diff(arrays[f"{count}/features"], arrays["1/features"])
    assert diffs["features"] <= 1e-5
    for method, metrics in report["1"]["metrics"].items():
        _assert_metrics_close(report[str(count)]["metrics"][method], metrics)
    _assert_metrics_close(report[str(count)]["sweep"], report["1"]["sweep"])
    return diffs


def _assert_metrics_close(metrics: dict, reference: dict) -> None:
    assert metrics.keys() == reference.keys()
    for name, value in reference.items():
        if isinstance(value, float):
            assert metrics[name] == pytest.approx(value, abs=1e-4), name
        else:
            assert metrics[name] == value, name


@pytest.mark.parametrize("counts", [pytest.param("1,3", id="1-vs-3-devices"),
                                    pytest.param("1,3,8", marks=pytest.mark.slow, id="1-vs-3-vs-8-devices")])
def test_scoring_over_devices_equals_one_device(tmp_path, counts):
    """3 devices: a batch of 8 becomes 9 rows (3 per device), the 16 test images two batches with
    2 padding rows; 8 devices: one row per device. The features of 6 images stay sharded along the
    images where 6 divides by the device count (3), replicated where it does not (8)."""
    done = _run(["devices", str(tmp_path / "scores"), counts], _env(8))
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "scores.json").read_text())
    with np.load(tmp_path / "scores.npz") as data:
        arrays = {key: data[key] for key in data.files}
    diffs = {count: _check_against_one_device(arrays, report, count) for count in map(int, counts.split(","))}
    print(json.dumps(diffs))  # the figures, for the report (pytest -s)
    assert report["3"]["features_spec"] in ("PartitionSpec('data',)", "P('data',)")
    assert report["3"]["features_devices"] == 3
    if "8" in report:
        assert report["8"]["features_spec"] in ("PartitionSpec()", "P()") and report["8"]["features_devices"] == 8


def test_two_processes_score_like_one(tmp_path):
    """Two gloo processes, 2 devices each, score a class over the 4 devices: both hold the same
    gathered maps, equal to one process on one device, and only process 0 wrote the outputs."""
    import jax

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    processes = [subprocess.Popen([sys.executable, str(WORKER), "processes", str(tmp_path)], cwd=REPO_ROOT,
                                  env=_env(2, {"NEXVITAD_PROCESS_ID": str(i),
                                               "NEXVITAD_COORDINATOR": f"localhost:{port}"}),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    reference = _score_main_job(jax.devices()[:1], tmp_path / "reference")  # this process: one device
    for process in processes:
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-4000:]
    gathered = []
    for index in range(2):
        with np.load(tmp_path / f"maps{index}.npz") as data:
            gathered.append({key: data[key] for key in data.files})
    diffs = {}
    for name, expected in reference.items():
        np.testing.assert_array_equal(gathered[0][name], gathered[1][name])
        diffs[name] = _max_abs_diff(gathered[0][name], expected)
        assert diffs[name] <= 2e-5 * max(1.0, float(np.max(np.abs(expected)))), name
    print(json.dumps(diffs))  # the figures, for the report (pytest -s)
    written, expected = (json.loads((tmp_path / folder / "classes" / f"{CATEGORY}.json").read_text())["metrics"]
                         for folder in ("workdir0", "reference"))
    for method in expected:
        _assert_metrics_close(written[method], expected[method])
    assert not (tmp_path / "workdir1").exists()  # process 1 wrote nothing


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "devices":
        worker_devices(*rest)
    elif command == "processes":
        worker_processes(*rest)
    else:
        raise SystemExit(f"unknown worker command {command!r}")
