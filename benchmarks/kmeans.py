"""Sinkhorn K-means speed, side by side with Lloyd k-means in OTT-JAX, scikit-learn and faiss-cpu.

    python benchmarks/kmeans.py            # CPU (~20 min on 2 cores), writes benchmarks/results/kmeans.json
    python benchmarks/kmeans.py --quick    # a smoke run, results/kmeans_quick.json
    python benchmarks/kmeans.py --sections sweep,latency   # re-run some sections, keep the others
    python benchmarks/kmeans.py --device   # accelerator: K = 8..4096 sweep at N = 1e6, D = 1024, matmul peak,
                                           # Fig. 9 latency with Hiera-Huge + DINOv2-S in bf16

Every method runs the same number of iterations from the same initial prototypes (tol 0; scikit-learn
stops early when no label changes, so its own iteration count is recorded), after a warm-up that
compiles (the JAX programs take max_iters as a traced argument, so a 1-iteration warm-up compiles the
measured program). Competitors run in the same process, one after another, so they see the same
machine load; the load average is recorded per section, and the solver options in `environment`.
Top-level keys other than the sections (`notes`: measurements quoted by the code's comments) are
kept when the script rewrites the JSON. Sections:
- sweep: K = 5, 10, 20, 30, 40 at N = 31,360 (the paper's bank), D = 2048, 10 iterations: `sweep_k`
  (one program, k-means++ included) against five separate scikit-learn KMeans runs (k-means++
  included: the issue's goal ratio < 0.2), and both again without initialization (iterations only).
- per_iteration: N = 31,360, D = 1024 and 2048, K = 5 .. 4096: time per iteration of each method and
  the rate of the distance step (2 N K D flops per distance matmul); the measured distance matmul
  alone for ours; the implied rate 2 N K D / (time per iteration) for every method.
- large_n: N = 10^6, D = 1024, as far as this machine's memory and time allow (see `skipped`).
- latency: the paper's Fig. 9 protocol (batch 1..15, K 5..40), `AnomalyDetector.predict` with the tiny
  random Hiera on CPU (Hiera-Huge + DINOv2-S bf16 with --device).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexvitad_jax.inference import SolverOptions, sinkhorn_kmeans, sweep_k  # noqa: E402
from nexvitad_jax.inference._ott_compat import ott_k_means  # noqa: E402
from nexvitad_jax.inference.kmeans_init import kmeans_plus_plus  # noqa: E402
from nexvitad_jax.inference.sinkhorn_kmeans import squared_distances  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SWEEP_KS = (5, 10, 20, 30, 40)
OPTIONS = SolverOptions()  # every run of ours; recorded in the results' environment


def median_time(fn, repeats: int, warmup=None) -> float:
    (warmup or fn)()  # compilation and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def block(tree):
    return jax.tree.map(lambda a: a.block_until_ready() if isinstance(a, jax.Array) else a, tree)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def feature_bank(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Synthetic features: 64 Gaussian modes of unequal size (backbone-like scale), float32, built in
    blocks of rows so N = 10^6 needs no float64 copy."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3.0, (64, d)).astype(np.float32)
    labels = rng.choice(64, size=n, p=rng.dirichlet(np.ones(64) * 0.5))
    x = np.empty((n, d), np.float32)
    for start in range(0, n, 65536):
        rows = slice(start, min(start + 65536, n))
        x[rows] = centers[labels[rows]] + rng.standard_normal((rows.stop - start, d), dtype=np.float32)
    return x


def sklearn_kmeans(x, k, iterations, init=None):
    from sklearn.cluster import KMeans

    return KMeans(k, init="k-means++" if init is None else init, n_init=1, max_iter=iterations, tol=0.0,
                  algorithm="lloyd", random_state=0).fit(x)


def sweep_section(n, d, ks, iterations, repeats):
    """The goal ratio. Ours and scikit-learn alternate, `repeats` pairs, so each pair sees the same
    load (scikit-learn's k-means++ slows down ~10x on a loaded machine); the ratio is the median
    over the pairs."""
    x_np = feature_bank(n, d)
    x = jnp.asarray(x_np)
    row = {"n": n, "d": d, "ks": list(ks), "iterations": iterations, "repeats": repeats,
           "load_average_before": load_average()}
    sweep = lambda max_iters: block(sweep_k(x, ks, rng=jax.random.key(0), max_iters=max_iters, tol=0.0,
                                            options=OPTIONS))
    init = jax.jit(kmeans_plus_plus, static_argnames=("k", "options"))
    centers = np.asarray(init(x, k=max(ks), rng=jax.random.key(0), options=OPTIONS))
    sweep(1)  # compiles the measured program (max_iters is traced)
    timings = {"sweep_k_s": [], "sklearn_5_runs_s": [], "sklearn_5_runs_from_init_s": []}
    for _ in range(repeats):
        start = time.perf_counter()
        sweep(iterations)
        timings["sweep_k_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        fits = [sklearn_kmeans(x_np, k, iterations) for k in ks]  # k-means++ included: the goal
        timings["sklearn_5_runs_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        fits_from_init = [sklearn_kmeans(x_np, k, iterations, init=centers[:k]) for k in ks]
        timings["sklearn_5_runs_from_init_s"].append(time.perf_counter() - start)
    row.update({name: statistics.median(values) for name, values in timings.items()})
    row["samples_s"] = timings
    row["sklearn_iterations_run"] = [int(fit.n_iter_) for fit in fits]
    row["sklearn_iterations_run_from_init"] = [int(fit.n_iter_) for fit in fits_from_init]
    row["sweep_k_plus_plus_s"] = median_time(lambda: block(init(x, k=max(ks), rng=jax.random.key(0), options=OPTIONS)),
                                             repeats)
    result = sweep_k(x, ks, rng=jax.random.key(0), max_iters=iterations, tol=0.0, options=OPTIONS)
    row["newton_passes_last_solve"] = np.asarray(result.result.newton_steps).tolist()
    row["sinkhorn_iterations_last_solve"] = np.asarray(result.result.sinkhorn_iterations).tolist()
    sizes = np.asarray(result.result.cluster_sizes)
    row["max_cluster_size_deviation"] = [float(np.abs(sizes[i, :k] * k / n - 1).max()) for i, k in enumerate(ks)]
    # Five separate runs of ours (five programs), to show what one joint pass saves.
    separate = lambda max_iters: [block(sinkhorn_kmeans(x, k, rng=jax.random.key(0), max_iters=max_iters, tol=0.0,
                                                        options=OPTIONS)[0]) for k in ks]
    row["separate_sinkhorn_kmeans_s"] = median_time(lambda: separate(iterations), 1, warmup=lambda: separate(1))
    pairs = lambda ours, theirs: statistics.median(a / b for a, b in zip(ours, theirs))
    row["sweep_over_sklearn"] = pairs(timings["sweep_k_s"], timings["sklearn_5_runs_s"])
    row["sweep_over_sklearn_without_init"] = pairs([t - row["sweep_k_plus_plus_s"] for t in timings["sweep_k_s"]],
                                                   timings["sklearn_5_runs_from_init_s"])
    row["sweep_over_separate_runs"] = row["sweep_k_s"] / row["separate_sinkhorn_kmeans_s"]
    row["goal_sweep_over_sklearn_below"] = 0.2
    row["load_average_after"] = load_average()
    return row


def per_iteration_row(x, x_np, k, iterations, repeats, *, methods=("ours", "ott", "sklearn", "faiss")):
    """Time per iteration of every method from the same initial prototypes (k-means++ up to K = 256 at
    N <= 10^5; beyond, K random points: k-means++ is K passes over the bank); `methods` may leave some out."""
    import faiss

    n, d = x.shape
    if k <= 256 and n <= 100_000:
        init = jax.jit(kmeans_plus_plus, static_argnames=("k", "options"))(x, k=k, rng=jax.random.key(0),
                                                                           options=OPTIONS)
        init_name = "k-means++"
    else:
        init, init_name = x[jax.random.choice(jax.random.key(0), n, (k,), replace=False)], "random points"
    init_np = np.asarray(init)
    flops = 2.0 * n * k * d
    row = {"n": n, "d": d, "k": k, "iterations": iterations, "repeats": repeats, "init": init_name,
           "load_average_before": load_average()}
    distance = jax.jit(squared_distances)
    row["distance_step_s"] = median_time(lambda: block(distance(x, init)), repeats)
    row["distance_gflops"] = flops / row["distance_step_s"] / 1e9
    per_iter = {}
    if "ours" in methods:
        run = lambda max_iters: block(sinkhorn_kmeans(x, k, rng=jax.random.key(0), init=init, max_iters=max_iters,
                                                      tol=0.0, options=OPTIONS))
        per_iter["sinkhorn_kmeans"] = median_time(lambda: run(iterations), repeats, warmup=lambda: run(1)) / iterations
        result = sinkhorn_kmeans(x, k, rng=jax.random.key(0), init=init, max_iters=iterations, tol=0.0,
                                 options=OPTIONS)[1]
        row["sinkhorn_kmeans_last_solve"] = {"newton_passes": int(result.newton_steps),
                                             "sinkhorn_iterations": int(result.sinkhorn_iterations),
                                             "sinkhorn_converged": bool(result.sinkhorn_converged)}
    if "ott" in methods:
        ott = lambda max_iters: block(ott_k_means.k_means(
            x, k, init=lambda geom, k, rng: init, n_init=1, tol=0.0, min_iterations=max_iters,
            max_iterations=max_iters, rng=jax.random.key(0)).centroids)
        per_iter["ott_lloyd"] = median_time(lambda: ott(iterations), repeats, warmup=lambda: ott(1)) / iterations
    if "sklearn" in methods:
        fit = sklearn_kmeans(x_np, k, iterations, init=init_np)  # also the warm-up
        row["sklearn_iterations_run"] = int(fit.n_iter_)
        per_iter["sklearn_lloyd"] = median_time(lambda: sklearn_kmeans(x_np, k, iterations, init=init_np),
                                                repeats, warmup=lambda: None) / fit.n_iter_

    if "faiss" in methods:
        def run_faiss():
            kmeans = faiss.Kmeans(d, k, niter=iterations, seed=0, max_points_per_centroid=n)
            kmeans.train(x_np, init_centroids=init_np)

        per_iter["faiss_lloyd"] = median_time(run_faiss, repeats, warmup=lambda: None) / iterations
    for name, seconds in per_iter.items():
        row[f"{name}_per_iter_s"] = seconds
        row[f"{name}_implied_distance_gflops"] = flops / seconds / 1e9
    if "sinkhorn_kmeans" in per_iter:
        for name in ("sklearn_lloyd", "faiss_lloyd", "ott_lloyd"):
            if name in per_iter:
                row[f"sinkhorn_over_{name.split('_')[0]}"] = per_iter["sinkhorn_kmeans"] / per_iter[name]
    row["skipped"] = [m for m in ("ours", "ott", "sklearn", "faiss") if m not in methods]
    row["load_average_after"] = load_average()
    return row


def per_iteration_section(n, configs, repeats, record):
    """configs: (d, k, iterations, methods) rows, one bank per D; one repeat from K = 1024 on."""
    rows = []
    for d in sorted({c[0] for c in configs}):
        x_np = feature_bank(n, d)
        x = jnp.asarray(x_np)
        for _, k, iterations, methods in [c for c in configs if c[0] == d]:
            rows.append(per_iteration_row(x, x_np, k, iterations, 1 if k >= 1024 else repeats, methods=methods))
            record(rows)
        del x, x_np
    return rows


def large_n_section(n, d, ks, iterations, record):
    """N = 10^6: the bank is generated in JAX block by block (4 GB at D = 1024, no temporaries of its
    size) and viewed, not copied, by NumPy."""
    centers = 3.0 * jax.random.normal(jax.random.key(1), (64, d))

    def rows(key):  # 64 Gaussian modes, like feature_bank (equal sizes here)
        labels = jax.random.randint(jax.random.fold_in(key, 1), (n // 100,), 0, 64)
        return centers[labels] + jax.random.normal(key, (n // 100, d))

    x = block(jax.jit(lambda keys: jax.lax.map(rows, keys).reshape(n, d))(jax.random.split(jax.random.key(0), 100)))
    x_np = np.asarray(x)  # a read-only view of the JAX buffer on CPU
    rows = []
    for k in ks:
        rows.append(per_iteration_row(x, x_np, k, iterations, 1, methods=("ours", "ott", "faiss")))
        record({"rows": rows, "skipped": SKIPPED_LARGE_N})
    return {"rows": rows, "skipped": SKIPPED_LARGE_N}


SKIPPED_LARGE_N = ("scikit-learn at N = 10^6 (KMeans copies the 4 GB bank to center it, beyond this machine's "
                   "8 GB budget); D = 2048 and K > 128 (memory and time); the sweep K = 8..4096 (--device)")


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
    load_before = load_average()
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
    return {"extractor": name, "image_size": 224, "rows": rows, "load_average_before": load_before,
            "load_average_after": load_average()}


def matmul_peak(repeats, size=8192):
    a = jax.random.normal(jax.random.key(0), (size, size))
    matmul = jax.jit(lambda a: a @ a)
    seconds = median_time(lambda: block(matmul(a)), repeats)
    return 2.0 * size ** 3 / seconds / 1e9


def device_sweep(repeats):
    n, d, iterations = 1_000_000, 1024, 20
    ks = [2 ** p for p in range(3, 13)]
    x = jax.random.normal(jax.random.key(0), (n, d))
    run = lambda max_iters: block(sweep_k(x, ks, rng=jax.random.key(0), max_iters=max_iters, tol=0.0,
                                          options=OPTIONS).prototypes)
    seconds = median_time(lambda: run(iterations), repeats, warmup=lambda: run(1))
    init = kmeans_plus_plus(x, 4096, jax.random.key(0), options=OPTIONS)
    t_distance = median_time(lambda: block(jax.jit(squared_distances)(x, init)), repeats)
    peak = matmul_peak(repeats)
    rate = 2.0 * n * 4096 * d / t_distance / 1e9
    return {"n": n, "d": d, "ks": ks, "iterations": iterations, "sweep_s": seconds, "goal_s": 60,
            "distance_gflops_k4096": rate, "matmul_peak_gflops": peak, "distance_peak_fraction": rate / peak}


def environment(args) -> dict:
    import faiss
    import sklearn

    return {"command": "python benchmarks/kmeans.py " + " ".join(sys.argv[1:]), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "machine": platform.processor() or platform.machine(),
            "platform": platform.platform(), "cpu_cores": len(os.sched_getaffinity(0)), "jax": jax.__version__,
            "sklearn": sklearn.__version__, "faiss": faiss.__version__, "quick": args.quick, "repeats": args.repeats,
            "solver_options": dataclasses.asdict(OPTIONS),
            "note": "other processes share this machine: compare methods within a section, not across runs"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--device", action="store_true", help="the accelerator sections")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="sweep,per_iteration,large_n,latency",
                        help="comma-separated sections to run; the others keep their numbers in the JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    RESULTS.mkdir(exist_ok=True)
    name = "kmeans_device" if args.device else "kmeans_quick" if args.quick else "kmeans"
    path = RESULTS / f"{name}.json"
    report = json.loads(path.read_text()) if path.is_file() and not args.quick else {}
    report["environment"] = environment(args)
    sections = set(args.sections.split(","))

    def record(section: str, value) -> None:  # written after every row: partial runs keep their numbers
        report[section] = value
        path.write_text(json.dumps(report, indent=2) + "\n")

    everything = ("ours", "ott", "sklearn", "faiss")
    if args.device:
        record("device_sweep", device_sweep(args.repeats))
        record("latency", latency_section((1, 5, 10, 15), SWEEP_KS, args.repeats, device=True))
    elif args.quick:
        record("sweep", sweep_section(4096, 256, SWEEP_KS, 5, 1))
        record("per_iteration", per_iteration_section(4096, [(256, 5, 5, everything), (256, 64, 5, everything)], 1,
                                                      lambda rows: record("per_iteration", rows)))
        record("latency", latency_section((1, 5), (5, 40), 1, device=False))
    else:
        if "sweep" in sections:
            record("sweep", sweep_section(31_360, 2048, SWEEP_KS, 10, args.repeats))
        if "per_iteration" in sections:
            # K >= 1024 runs one iteration: Newton's K x K Hessian makes each one long (the rows' times).
            configs = [(d, k, 5, everything) for d in (1024, 2048) for k in (5, 40, 256)]
            configs += [(1024, 1024, 1, everything), (2048, 1024, 1, everything), (1024, 4096, 1, everything)]
            per_iteration_section(31_360, configs, args.repeats, lambda rows: record("per_iteration", rows))
        if "large_n" in sections:
            large_n_section(1_000_000, 1024, (40, 128), 2, lambda value: record("large_n", value))
        if "latency" in sections:
            record("latency", latency_section((1, 5, 10, 15), SWEEP_KS, args.repeats, device=False))
    print(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
