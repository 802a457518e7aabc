"""Data benchmark: synthetic-set generation and MVTec loading paths, side by side.

Measured in one run on this machine:
- the embedded synthetic set (12 classes x (20 train + 16 test) at 224 by default) generated
  with 1 thread and with 2 threads (the issue's goal: under 30 s on 2 cores);
- the real MVTec sample (../shared/data/mvtec_reduced): a cold decode (PNG -> arrays), the warm
  .npz cache, and a TFDS array_record build + read with `tfds.data_source`.

    python benchmarks/data.py            # writes benchmarks/results/data.json
    python benchmarks/data.py --quick    # 4 classes at 112; writes benchmarks/results/data_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from nexvitad_jax.data import SYNTHETIC_CLASSES, open_dataset
from nexvitad_jax.data.synthetic import generate_category

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
MVTEC_REDUCED = REPO_ROOT.parent / "shared" / "data" / "mvtec_reduced"


def _time(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_synthetic(classes, image_size: int, n_train: int = 20, n_test: int = 16) -> dict:
    def generate(workers: int):
        for category in classes:
            generate_category(category, "train", n_train, image_size=image_size, workers=workers)
            generate_category(category, "test", n_test, image_size=image_size, workers=workers)

    times = {f"threads_{w}": _time(lambda w=w: generate(w)) for w in (1, 2)}
    n_images = len(classes) * (n_train + n_test)
    return {
        "classes": len(classes), "image_size": image_size, "images": n_images,
        "seconds": times,
        "ms_per_image_2_threads": 1000 * times["threads_2"] / n_images,
        "speedup_2_vs_1_thread": times["threads_1"] / times["threads_2"],
        "goal_under_30s": times["threads_2"] < 30.0,
    }


def bench_mvtec(image_size: int) -> dict:
    if not MVTEC_REDUCED.is_dir():
        return {"skipped": f"{MVTEC_REDUCED} missing"}
    import tensorflow_datasets as tfds

    from nexvitad_jax.data import tfds_mvtec

    with tempfile.TemporaryDirectory() as tmp:
        def load_all(cache):
            dataset = open_dataset(MVTEC_REDUCED, image_size=image_size, cache_dir=cache)
            return [dataset.load(c, s) for c in dataset.classes for s in ("train", "test")]

        cold = _time(lambda: load_all(Path(tmp) / "npz"))
        warm = _time(lambda: load_all(Path(tmp) / "npz"), repeats=3)
        n_images = sum(len(a) for a in load_all(Path(tmp) / "npz"))

        config_names = {}

        def build():
            for category in ("hazelnut", "transistor"):
                builder = tfds_mvtec.prepare(
                    MVTEC_REDUCED, category, Path(tmp) / "tfds", image_size=image_size
                )
                config_names[category] = builder.builder_config.name

        tfds_build = _time(build)

        def read_tfds():
            for category in ("hazelnut", "transistor"):
                for split in ("train", "test"):
                    source = tfds.data_source(
                        f"mvtec_ad/{config_names[category]}", split=split, data_dir=str(Path(tmp) / "tfds")
                    )
                    tfds_mvtec.to_category_arrays(source)

        tfds_read = _time(read_tfds, repeats=3)
    return {
        "images": n_images, "image_size": image_size,
        "seconds": {"decode_cold": cold, "npz_cache_warm": warm, "tfds_build": tfds_build,
                    "tfds_data_source_read": tfds_read},
        "cold_over_npz_cache": cold / warm,
        "cold_over_tfds_read": cold / tfds_read,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 classes at 112 (seconds)")
    args = parser.parse_args()
    classes = SYNTHETIC_CLASSES[:4] if args.quick else SYNTHETIC_CLASSES
    size = 112 if args.quick else 224
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "note": "shared CPU: compare ratios within this run only"},
        "synthetic": bench_synthetic(classes, size),
        "mvtec_reduced": bench_mvtec(size),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("data_quick.json" if args.quick else "data.json")
    out.write_text(json.dumps(results, indent=2, default=lambda x: np.asarray(x).tolist()))
    print(json.dumps(results, indent=2, default=lambda x: np.asarray(x).tolist()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
