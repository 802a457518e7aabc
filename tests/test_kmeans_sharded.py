"""Sinkhorn K-means on a bank spread over devices equals the one-device fit: `sinkhorn_kmeans` and
`sweep_k` on 8 fake CPU devices against 1 (N divisible by 8 and not, K above N / 8, Newton on and
off, stored and blockwise costs), the same k-means++ draws, OTT's Sinkhorn on a geometry spread
over devices against OTT on one device, the memory bank from features split along the images or
replicated, the compiled program's collectives (reductions only, none of the bank's rows), and two
gloo processes against one process.

Run as a script, this file is the worker those tests start: `python tests/test_kmeans_sharded.py
{case,draws,sinkhorn,collectives,memory_bank,processes} ...`. Each worker compiles with XLA's fast
compilation (optimization level 0): compilation is most of what these small fits cost."""

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
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# Prototypes of the fit on several devices against the fit on one: max |difference| / max |prototype|.
TOLERANCE = 1e-4
# Sinkhorn alone solves to its threshold: at the default 1e-3 the prototypes' shift stalls near the
# stopping tol and the stopping iteration then turns on rounding (one device's own fit moves as
# much with the block size), so those cases solve to 1e-5 (Newton's own default is 1e-4).
SINKHORN_ALONE = {"sinkhorn_threshold": 1e-5, "sinkhorn_max_iters": 5000}
CASES = {
    "kmeans-uneven-blockwise-newton": {"ks": [9], "n": 2001, "options": {"dense_cost_bytes": 0, "chunk_size": 64}},
    "kmeans-k-above-rows-per-device-sinkhorn": {"ks": [16], "n": 96, "centers": 16,
                                                "options": {"newton_steps": 0, **SINKHORN_ALONE}},
    "kmeans-even-stored-newton": {"ks": [7], "n": 2000, "options": {}},
    "sweep-even-stored": {"ks": [9, 2, 8], "n": 1000, "options": {}},
    "sweep-uneven-blockwise-newton-for-k2": {"ks": [9, 2, 8], "n": 1003, "options": {
        "newton_max_k": 4, "dense_cost_bytes": 0, "chunk_size": 100, **SINKHORN_ALONE}},
}
SLOW_CASES = {"kmeans-even-stored-newton", "sweep-uneven-blockwise-newton-for-k2"}


def _env(devices: int, extra: dict | None = None) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}", **(extra or {}))


def _run(args, devices: int = 8, timeout: int = 600):
    done = subprocess.run([sys.executable, str(WORKER), *args], env=_env(devices), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def bank(n: int, d: int = 12, seed: int = 1, centers: int = 6) -> np.ndarray:
    """Gaussian blobs, float32."""
    from sklearn.datasets import make_blobs

    return make_blobs(n_samples=n, centers=centers, n_features=d, cluster_std=2.0,
                      random_state=seed)[0].astype(np.float32)


def relative_difference(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ------------------------------------------------------------------------------------------------
# workers (each prints one JSON line)


def _spread(x: np.ndarray, mesh):
    """The bank on every device of `mesh`: split along its rows where they divide, else replicated."""
    import jax

    from nexvitad_jax.sharding import replicated, row_sharding

    return jax.device_put(x, row_sharding(mesh) if len(x) % mesh.size == 0 else replicated(mesh))


def _fit(x, ks, options: dict):
    """(prototypes per K, iterations, Newton passes) of sinkhorn_kmeans (one K) or sweep_k."""
    import jax

    from nexvitad_jax.inference import SolverOptions, sinkhorn_kmeans, sweep_k

    options, stopping = SolverOptions(**options), {"max_iters": 40, "tol": 1e-4}
    if len(ks) == 1:
        prototypes, result = sinkhorn_kmeans(x, ks[0], rng=jax.random.key(4), options=options, **stopping)
        return [np.asarray(prototypes)], [int(result.iterations)], [int(result.newton_steps)]
    sweep = sweep_k(x, ks, rng=jax.random.key(4), options=options, **stopping)
    return ([np.asarray(p) for p in sweep.prototypes], np.asarray(sweep.result.iterations).tolist(),
            np.asarray(sweep.result.newton_steps).tolist())


def worker_case(name: str) -> dict:
    """One case of CASES on 8 devices and on 1: the prototypes' difference, both runs' iterations."""
    from nexvitad_jax.sharding import make_mesh

    case = CASES[name]
    x = bank(case["n"], centers=case.get("centers", 6))
    spread = _spread(x, make_mesh())
    one, many = _fit(x, case["ks"], case["options"]), _fit(spread, case["ks"], case["options"])
    return {"difference": max(relative_difference(a, b) for a, b in zip(many[0], one[0])),
            "iterations": [one[1], many[1]], "newton": [one[2], many[2]], "devices": len(spread.sharding.device_set)}


def worker_draws() -> dict:
    """k-means++ (K = 40: rejection sampling and the exact fallback's updates) on 2001 rows, on one
    device and with the rows over 8 (padded to 2008): the centers drawn."""
    import functools

    import jax

    from nexvitad_jax.inference.kmeans_init import kmeans_plus_plus
    from nexvitad_jax.inference.sinkhorn_kmeans import _over_rows, _place_bank
    from nexvitad_jax.sharding import make_mesh, replicated

    x = bank(2001, d=16)
    draw = lambda shard, x, rng: kmeans_plus_plus(x, 40, rng, shard=shard)
    run = jax.jit(functools.partial(_over_rows, draw), static_argnames=("mesh", "rows"))
    one = run(x, jax.random.key(3), mesh=None, rows=None)
    padded, mesh = _place_bank(_spread(x, make_mesh()))
    many = run(padded, jax.device_put(jax.random.key(3), replicated(mesh)), mesh=mesh, rows=len(x))
    return {"equal": bool(np.array_equal(np.asarray(one), np.asarray(many))), "padded_rows": padded.shape[0],
            "distinct": len({tuple(row) for row in np.asarray(one)})}


def worker_sinkhorn() -> dict:
    """OTT's Sinkhorn on this device's rows of a geometry spread over 8 devices (stored costs and an
    online PointCloud; 203 rows padded to 208 with rows of no mass) against OTT on the whole
    geometry on one device: potentials, iterations, convergence."""
    import jax
    import jax.numpy as jnp

    from nexvitad_jax.inference._ott_compat import geometry, linear_problem, pointcloud, sinkhorn
    from nexvitad_jax.inference.transport import BankBlocks, BlockCosts, Shard, squared_distances_from_norms
    from nexvitad_jax.sharding import make_mesh

    x, y = bank(203, d=5), bank(7, d=5, seed=2)
    EPSILON = 0.05 * float(np.mean(np.sum((x - x.mean(0)) ** 2, 1)))  # as the K-means sets it
    solver = sinkhorn.Sinkhorn(threshold=1e-6, max_iterations=5000)
    b = jnp.full((7,), 1 / 7)
    report, mesh = {}, make_mesh()
    for stored in (True, False):
        whole = (geometry.Geometry(cost_matrix=jnp.sum((x[:, None] - y[None]) ** 2, -1), epsilon=EPSILON) if stored
                 else pointcloud.PointCloud(x, y, epsilon=EPSILON, batch_size=16))
        reference = solver(linear_problem.LinearProblem(whole, a=jnp.full((203,), 1 / 203), b=b))

        def local(rows):
            shard = Shard.split("data", rows.shape[0], 203)
            bank_rows = BankBlocks.of(rows, jnp.sum(rows * rows, 1), 16, shard)
            cost = squared_distances_from_norms(rows, bank_rows.x_sq, y, jnp.sum(y * y, 1)) if stored else None
            geom = BlockCosts(bank_rows, cost, None if stored else y, jnp.sum(y * y, 1)).geometry(EPSILON)
            a = shard.where_real(jnp.full((rows.shape[0],), 1 / 203), 0.0)
            out = solver(linear_problem.LinearProblem(geom, a=a, b=b))
            return out.f, out.g, out.n_iters, out.converged

        padded = jnp.pad(jnp.asarray(x), ((0, 5), (0, 0)))
        f, g, iterations, converged = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=jax.P("data"),
                                                            out_specs=(jax.P("data"), jax.P(), jax.P(), jax.P()),
                                                            check_vma=False))(padded)
        report["stored" if stored else "online"] = {
            "f": relative_difference(np.asarray(f)[:203], reference.f), "g": relative_difference(g, reference.g),
            "padding_f": np.asarray(f)[203:].tolist(), "iterations": [int(reference.n_iters), int(iterations)],
            "converged": [bool(reference.converged), bool(converged)]}
    return report


def worker_collectives() -> dict:
    """The collectives of the compiled sweep (k-means++ included) on 8 x 1237 rows of D = 24, with
    stored and with blockwise costs (benchmarks/scale_out.py compiles it), and of laying out a
    replicated bank of 8 x 1237 - 3 rows along its rows."""
    import jax
    import jax.numpy as jnp

    from benchmarks.scale_out import collectives, compile_sweep
    from nexvitad_jax.inference import SolverOptions
    from nexvitad_jax.inference.sinkhorn_kmeans import _rows_padded
    from nexvitad_jax.sharding import make_mesh, replicated, row_sharding

    mesh, rows = make_mesh(), 8 * 1237
    shapes = lambda compiled: [(row["op"], row["shapes"]) for row in collectives(compiled.as_text())]
    report = {name: shapes(compile_sweep(rows, 24, [5, 40, 48], options))
              for name, options in (("stored", SolverOptions()),
                                    ("blockwise", SolverOptions(dense_cost_bytes=0, chunk_size=300)))}
    replicated_bank = jax.ShapeDtypeStruct((rows - 3, 24), jnp.float32, sharding=replicated(mesh))
    report["layout"] = shapes(_rows_padded.lower(replicated_bank, pad=3, sharding=row_sharding(mesh)).compile())
    return report


def _features(m: int, size: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(m, size, size, d)).astype(np.float32) + np.arange(d)


def worker_memory_bank() -> dict:
    """fit_memory_banks on features of 16 images split along the images over 8 devices, and of 10
    images replicated on them, against the same features on one device; and where the flattened
    banks lie."""
    import jax

    from nexvitad_jax.inference.memory_bank import fit_memory_banks, layer_patches
    from nexvitad_jax.inference.sinkhorn_kmeans import _place_bank
    from nexvitad_jax.sharding import make_mesh

    mesh, report = make_mesh(), {}
    for m, size, d in ((16, 4, 6), (10, 2, 10)):
        features = [_features(m, size, d, m)]
        spread = [_spread(f, mesh) for f in features]
        one = fit_memory_banks(features, [3, 5], rng=jax.random.key(2), max_iters=30)
        many = fit_memory_banks(spread, [3, 5], rng=jax.random.key(2), max_iters=30)
        placed = [_place_bank(layer_patches(i, f))[0] for i, f in enumerate(spread)]
        report[m] = {"difference": max(relative_difference(a, b) for k in (3, 5) for a, b in
                                       zip(many[k].prototypes, one[k].prototypes)),
                     "features_spec": str(spread[0].sharding.spec), "bank_spec": str(placed[0].sharding.spec),
                     "rows_per_device": [sorted({s.data.shape[0] for s in p.addressable_shards}) for p in placed]}
    return report


def worker_processes(out: str) -> None:
    """One of two gloo processes (2 CPU devices each) fitting the memory bank (K = 6 and 3: one
    sweep_k) of 8 images' features, of which each process holds the 4 of its devices. With
    NEXVITAD_PROCESS_ID unset: the same on one device of one process. Results to OUT."""
    import jax

    process = os.environ.get("NEXVITAD_PROCESS_ID")
    if process is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ["NEXVITAD_COORDINATOR"], num_processes=2,
                                   process_id=int(process))
    from nexvitad_jax.inference import SolverOptions, fit_memory_banks
    from nexvitad_jax.sharding import make_mesh, row_sharding

    features = _features(8, 4, 6, 0)
    if process is not None:
        mesh = make_mesh()
        assert mesh.size == 4 and len(jax.local_devices()) == 2, jax.devices()
        # Each process places only the images of its own devices.
        features = jax.make_array_from_callback(features.shape, row_sharding(mesh), lambda index: features[index])
    banks = fit_memory_banks([features], [6, 3], rng=jax.random.key(6), max_iters=30,
                             options=SolverOptions(chunk_size=24))
    prototypes = {f"k{k}": np.asarray(banks[k].prototypes[0]) for k in (6, 3)}
    np.savez(out, iterations=np.asarray([int(banks[k].results[0].iterations) for k in (6, 3)]),
             spec=str(getattr(features, "sharding", "one")), **prototypes)


# ------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_CASES else [])
                                  for name in CASES])
def test_eight_devices_equal_one(name):
    report = _run(["case", name])
    assert report["devices"] == 8
    assert report["difference"] <= TOLERANCE, report
    one, many = report["iterations"]
    assert one == many, report  # each run stopped after as many iterations
    assert [n > 0 for n in report["newton"][0]] == [n > 0 for n in report["newton"][1]]


def test_kmeans_plus_plus_draws_equal_one_device():
    report = _run(["draws"])
    assert report["padded_rows"] == 2008 and report["distinct"] == 40
    assert report["equal"], "the centers drawn over 8 devices differ from one device's"


def test_ott_sinkhorn_across_devices_equals_ott_on_one_device():
    # Same threshold rule (L1 marginal error, checked every 10 iterations) and flag; the error
    # crosses the threshold at the same check or the next (the sums' order rounds differently:
    # measured 350 vs 360 iterations); the potentials agree to float32 rounding.
    for kind, report in _run(["sinkhorn"]).items():
        assert report["converged"] == [True, True], kind
        assert abs(report["iterations"][0] - report["iterations"][1]) <= 10, (kind, report)
        assert report["f"] <= 1e-5 and report["g"] <= 1e-5, (kind, report)
        assert report["padding_f"] == [float("-inf")] * 5, kind


def test_compiled_program_exchanges_reductions_only():
    # Local rows 1237: no collective may carry a dimension that large (the bank's rows); the ones
    # there are all-reduces of K-vectors, K x K Hessians, the (sum K, D) weighted sums, scalars, and
    # k-means++'s all-gather of one (high, low) pair per device.
    report = _run(["collectives"])
    for name in ("stored", "blockwise"):
        ops = report[name]
        assert {op for op, _ in ops} == {"all-reduce", "all-gather"}, ops
        assert all(max(dims, default=1) < 1237 for _, shapes in ops for dims in shapes), ops
        assert {str(shapes) for op, shapes in ops if op == "all-gather"} == {"[[8, 2]]"}
        assert any(op == "all-reduce" and [93, 24] in shapes for op, shapes in ops)  # the sums, 5 + 40 + 48 rows
    assert report["layout"] == [], "laying out a replicated bank along its rows moved data between devices"


def test_memory_bank_from_features_split_or_replicated():
    report = _run(["memory_bank"])
    split, replicated = report["16"], report["10"]
    assert "'data'" in split["features_spec"]
    assert "'data'" in split["bank_spec"] and split["rows_per_device"] == [[2 * 16]]  # each device its 2 images
    assert replicated["features_spec"] in ("PartitionSpec()", "P()")
    assert "'data'" in replicated["bank_spec"] and replicated["rows_per_device"] == [[5]]  # 40 rows over 8
    assert split["difference"] <= TOLERANCE and replicated["difference"] <= TOLERANCE, report


def test_two_processes_equal_one_process(tmp_path):
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = lambda i: _env(2, {"NEXVITAD_PROCESS_ID": str(i), "NEXVITAD_COORDINATOR": f"localhost:{port}"})
    processes = [subprocess.Popen([sys.executable, str(WORKER), "processes", str(tmp_path / f"process{i}.npz")],
                                  cwd=REPO_ROOT, env=env(i), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for i in range(2)]
    reference = subprocess.run([sys.executable, str(WORKER), "processes", str(tmp_path / "one.npz")], cwd=REPO_ROOT,
                               env=_env(1), capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-4000:]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-4000:]
    one = np.load(tmp_path / "one.npz")
    for i in range(2):
        both = np.load(tmp_path / f"process{i}.npz")
        assert "'data'" in str(both["spec"])
        np.testing.assert_array_equal(both["iterations"], one["iterations"])
        for name in ("k6", "k3"):
            assert relative_difference(both[name], one[name]) <= TOLERANCE, name


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    workers = {"case": worker_case, "draws": worker_draws, "sinkhorn": worker_sinkhorn,
               "collectives": worker_collectives, "memory_bank": worker_memory_bank}
    if command == "processes":
        worker_processes(*rest)
    else:
        print(json.dumps(workers[command](*rest)))
