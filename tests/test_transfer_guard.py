"""The cluster-count sweep runs under `jax.transfer_guard("disallow")`: the bank enters and the
results leave through explicit transfers only, on one device and spread over several, so a stray
`float(x)` or `np.asarray` in the fit's loop fails here. (Training steps: tests/test_train.py;
scoring: tests/test_inference.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np

from nexvitad_jax.inference.memory_bank import fit_memory_banks, layer_patches
from nexvitad_jax.inference.sinkhorn_kmeans import sweep_k

REPO_ROOT = Path(__file__).resolve().parents[1]


def _features(layers: int = 2):
    return [np.random.default_rng(i).normal(size=(4, 6, 6, 8)).astype(np.float32) for i in range(layers)]


def test_sweep_runs_under_the_transfer_guard():
    bank, rng = jax.device_put(_features(1)[0].reshape(-1, 8)), jax.random.key(0)
    with jax.transfer_guard("disallow"):
        sweep = sweep_k(bank, (3, 5, 9), rng=rng, max_iters=6)
        jax.block_until_ready(sweep)
    reference = sweep_k(np.asarray(bank), (3, 5, 9), rng=jax.random.key(0), max_iters=6)  # host input, no guard
    for ours, theirs in zip(sweep.prototypes, reference.prototypes):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_memory_banks_fit_under_the_transfer_guard():
    features = [jax.device_put(f) for f in _features()]
    rng = jax.random.key(3)
    with jax.transfer_guard("disallow"):
        banks = fit_memory_banks(features, (3, 5), rng=rng, max_iters=6, progress=False)
        jax.block_until_ready([bank.prototypes for bank in banks.values()])
    for layer, layer_features in enumerate(features):  # each layer's sweep keyed as before: fold_in(rng, layer)
        direct = sweep_k(layer_patches(layer, layer_features), (3, 5), rng=jax.random.fold_in(rng, layer), max_iters=6)
        for run, k in enumerate((3, 5)):
            np.testing.assert_array_equal(np.asarray(banks[k].prototypes[layer]), np.asarray(direct.prototypes[run]))
            assert int(banks[k].results[layer].iterations) == int(direct.result.iterations[run])


def test_sharded_sweep_runs_under_the_transfer_guard():
    """Three fake devices, the bank split along its rows and replicated: no implicit transfer."""
    script = textwrap.dedent("""
        import jax, numpy as np
        from nexvitad_jax.sharding import make_mesh, replicated, row_sharding
        from nexvitad_jax.inference.sinkhorn_kmeans import sweep_k
        mesh = make_mesh()
        assert mesh.size == 3, mesh
        host = np.random.default_rng(0).normal(size=(150, 8)).astype(np.float32)
        for sharding in (row_sharding(mesh), replicated(mesh)):
            bank, rng = jax.device_put(host, sharding), jax.random.key(0)
            with jax.transfer_guard("disallow"):
                sweep = sweep_k(bank, (3, 7), rng=rng, max_iters=6)
                jax.block_until_ready(sweep)
            one = sweep_k(host, (3, 7), rng=jax.random.key(0), max_iters=6)
            for a, b in zip(sweep.prototypes, one.prototypes):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        print("guarded")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=3")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "guarded" in done.stdout, done.stderr[-3000:]
