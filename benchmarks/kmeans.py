"""Sinkhorn K-means speed, side by side with Lloyd k-means in OTT-JAX, scikit-learn and faiss-cpu.

    python benchmarks/kmeans.py            # CPU subset (a few minutes), writes benchmarks/results/kmeans.json
    python benchmarks/kmeans.py --quick    # a smoke run, results/kmeans_quick.json
    python benchmarks/kmeans.py --device   # accelerator: K = 8..4096 sweep at N = 1e6, D = 1024, matmul peak,
                                           # Fig. 9 latency with Hiera-Huge + DINOv2-S in bf16

Every method runs the same number of iterations from the same initial prototypes (tol 0), after a
warm-up call, so compile time is excluded; times are medians of `--repeats` runs on this machine
and only their ratios are meant to be compared. Sections:
- sweep: K = 5, 10, 20, 30, 40 at N = 31,360 (the paper's bank), D = 2048: `sweep_k` (one program,
  k-means++ included) against five separate scikit-learn KMeans runs (k-means++ included).
- per_iteration: time per iteration and the distance step's FLOP rate (2 N K D per distance matmul).
- latency: the paper's Fig. 9 protocol (batch 1..15, K 5..40), `AnomalyDetector.predict` with the tiny
  random Hiera on CPU (Hiera-Huge + DINOv2-S bf16 with --device).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexvitad_jax.inference import sinkhorn_kmeans, sweep_k  # noqa: E402
from nexvitad_jax.inference._ott_compat import ott_k_means  # noqa: E402
from nexvitad_jax.inference.sinkhorn_kmeans import kmeans_plus_plus, squared_distances  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def block(tree):
    return jax.tree.map(lambda a: a.block_until_ready() if isinstance(a, jax.Array) else a, tree)


def feature_bank(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Synthetic features: 64 anisotropic Gaussian modes of unequal size (backbone-like scale)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3.0, (64, d)).astype(np.float32)
    sizes = rng.dirichlet(np.ones(64) * 0.5)
    labels = rng.choice(64, size=n, p=sizes)
    return (centers[labels] + rng.normal(0, 1.0, (n, d)).astype(np.float32)).astype(np.float32)


def sklearn_runs(x, ks, iterations, init=None):
    from sklearn.cluster import KMeans

    for k in ks:
        KMeans(k, init="k-means++" if init is None else init[:k], n_init=1, max_iter=iterations, tol=0.0,
               algorithm="lloyd", random_state=0).fit(x)


def sweep_section(n, d, ks, iterations, repeats):
    x_np = feature_bank(n, d)
    x = jnp.asarray(x_np)
    options = dict(max_iters=iterations, tol=0.0)
    ours = median_time(lambda: block(sweep_k(x, ks, rng=jax.random.key(0), **options).prototypes), repeats)
    vmapped = median_time(lambda: block(sweep_k(x, ks, rng=jax.random.key(0), parallel=True,
                                                **options).prototypes), repeats)
    sklearn = median_time(lambda: sklearn_runs(x_np, ks, iterations), repeats)
    separate = median_time(lambda: [block(sinkhorn_kmeans(x, k, rng=jax.random.key(0), **options)[0]) for k in ks],
                           repeats)
    sweep = sweep_k(x, ks, rng=jax.random.key(0), **options)
    return {"n": n, "d": d, "ks": list(ks), "iterations": iterations,
            "sweep_k_s": ours, "sweep_k_vmapped_s": vmapped, "separate_sinkhorn_kmeans_s": separate, "sklearn_5_runs_s": sklearn,
            "sweep_over_sklearn": ours / sklearn, "sweep_over_separate_runs": ours / separate, "goal_sweep_over_sklearn_below": 0.2,
            "sinkhorn_iterations_last": np.asarray(sweep.result.sinkhorn_iterations).tolist()}


def per_iteration_section(n, d, k, iterations, repeats):
    import faiss
    from sklearn.cluster import KMeans

    x_np = feature_bank(n, d)
    x = jnp.asarray(x_np)
    init = kmeans_plus_plus(x, k, jax.random.key(0))
    init_np = np.asarray(init)
    distance = jax.jit(squared_distances)
    t_distance = median_time(lambda: block(distance(x, init)), repeats)
    row = {"n": n, "d": d, "k": k, "iterations": iterations,
           "distance_step_s": t_distance, "distance_gflops": 2.0 * n * k * d / t_distance / 1e9}
    t_ours = median_time(lambda: block(sinkhorn_kmeans(x, k, rng=jax.random.key(0), init=init,
                                                       max_iters=iterations, tol=0.0)[0]), repeats)
    row["sinkhorn_kmeans_per_iter_s"] = t_ours / iterations
    t_ott = median_time(lambda: block(ott_k_means.k_means(x, k, init=lambda geom, k, rng: init, n_init=1, tol=0.0,
                                                          min_iterations=iterations, max_iterations=iterations,
                                                          rng=jax.random.key(0)).centroids), repeats)
    row["ott_lloyd_per_iter_s"] = t_ott / iterations
    t_sk = median_time(lambda: KMeans(k, init=init_np, n_init=1, max_iter=iterations, tol=0.0,
                                      algorithm="lloyd").fit(x_np), repeats)
    row["sklearn_lloyd_per_iter_s"] = t_sk / iterations

    def run_faiss():
        kmeans = faiss.Kmeans(d, k, niter=iterations, seed=0, max_points_per_centroid=n)
        kmeans.train(x_np, init_centroids=init_np)

    row["faiss_lloyd_per_iter_s"] = median_time(run_faiss, repeats) / iterations
    row["sinkhorn_over_sklearn"] = row["sinkhorn_kmeans_per_iter_s"] / row["sklearn_lloyd_per_iter_s"]
    row["sinkhorn_over_faiss"] = row["sinkhorn_kmeans_per_iter_s"] / row["faiss_lloyd_per_iter_s"]
    row["sinkhorn_over_ott_lloyd"] = row["sinkhorn_kmeans_per_iter_s"] / row["ott_lloyd_per_iter_s"]
    return row


def latency_section(batches, ks, repeats, *, device: bool):
    from flax import nnx

    from nexvitad_jax.inference import AnomalyDetector, BackboneFeatureExtractor
    from nexvitad_jax.inference.memory_bank import MemoryBank

    if device:
        from nexvitad_jax.models import build_backbone
        from nexvitad_jax.models.dinov2 import VARIANTS as DINO
        from nexvitad_jax.models.hiera import VARIANTS as HIERA

        hiera = build_backbone("hiera", HIERA["huge"], rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
        dino = build_backbone("dinov2", DINO["small"], rngs=nnx.Rngs(1), dtype=jnp.bfloat16)
        extractor = BackboneFeatureExtractor(hiera, {"family": "hiera", "variant": "huge"}, dino=dino,
                                             dino_identity={"family": "dinov2", "variant": "small"})
        name = "hiera-huge + dinov2-small, bf16, random init"
    else:
        extractor = BackboneFeatureExtractor.random(seed=0)
        name = "tiny random hiera (stage dims 16-128), fp32"
    rows = []
    for batch in batches:
        images = np.random.default_rng(batch).uniform(size=(batch, 224, 224, 3)).astype(np.float32)
        dims = [f.shape[-1] for f in extractor(jnp.asarray(images[:1]))]
        for k in ks:
            # Latency does not depend on the prototype values: random prototypes skip the fit.
            detector = AnomalyDetector(extractor, k=k, batch_size=batch)
            detector.memory_bank = MemoryBank([jax.random.normal(jax.random.key(i), (k, d)) for i, d in enumerate(dims)],
                                              [])
            seconds = median_time(lambda: detector.predict(images), repeats)
            rows.append({"batch": batch, "k": k, "latency_ms": 1e3 * seconds, "ms_per_image": 1e3 * seconds / batch})
    return {"extractor": name, "image_size": 224, "rows": rows}


def matmul_peak(repeats, size=8192):
    a = jax.random.normal(jax.random.key(0), (size, size))
    matmul = jax.jit(lambda a: a @ a)
    seconds = median_time(lambda: block(matmul(a)), repeats)
    return 2.0 * size ** 3 / seconds / 1e9


def device_sweep(repeats):
    n, d, iterations = 1_000_000, 1024, 20
    ks = [2 ** p for p in range(3, 13)]
    x = jax.random.normal(jax.random.key(0), (n, d))
    seconds = median_time(lambda: block(sweep_k(x, ks, rng=jax.random.key(0), max_iters=iterations, tol=0.0,
                                                parallel=False).prototypes), repeats)
    init = kmeans_plus_plus(x, 4096, jax.random.key(0))
    t_distance = median_time(lambda: block(jax.jit(squared_distances)(x, init)), repeats)
    peak = matmul_peak(repeats)
    rate = 2.0 * n * 4096 * d / t_distance / 1e9
    return {"n": n, "d": d, "ks": ks, "iterations": iterations, "sweep_s": seconds, "goal_s": 60,
            "distance_gflops_k4096": rate, "matmul_peak_gflops": peak, "distance_peak_fraction": rate / peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--device", action="store_true", help="the accelerator sections")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    report = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
              "machine": platform.processor() or platform.machine(), "quick": args.quick, "repeats": repeats}
    sweep_ks = (5, 10, 20, 30, 40)
    RESULTS.mkdir(exist_ok=True)
    name = "kmeans_device" if args.device else "kmeans_quick" if args.quick else "kmeans"
    path = RESULTS / f"{name}.json"

    def record(section: str, value) -> None:  # written after every section: partial runs keep their numbers
        report[section] = value
        path.write_text(json.dumps(report, indent=2) + "\n")

    if args.device:
        record("device_sweep", device_sweep(repeats))
        record("latency", latency_section((1, 5, 10, 15), sweep_ks, repeats, device=True))
    elif args.quick:
        record("sweep", sweep_section(4096, 256, sweep_ks, 5, repeats))
        record("per_iteration", [per_iteration_section(4096, 256, k, 5, repeats) for k in (5, 64)])
        record("latency", latency_section((1, 5), (5, 40), repeats, device=False))
    else:
        record("sweep", sweep_section(31_360, 2048, sweep_ks, 10, repeats))
        # The CPU subset: N = 31,360 at D = 1024 and 2048 with K = 5, 40, and K = 256 at D = 1024
        # (N = 1e6 and K = 4096 run with --device; on 2 shared CPU cores they take hours per method).
        configs = [(1024, 5), (1024, 40), (1024, 256), (2048, 5), (2048, 40)]
        rows = []
        for d, k in configs:
            rows.append(per_iteration_section(31_360, d, k, 5, repeats))
            record("per_iteration", rows)
        record("latency", latency_section((1, 5, 10, 15), sweep_ks, repeats, device=False))
    print(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
