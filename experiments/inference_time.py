"""The paper's inference-time comparison (Fig. 9): latency of memory-bank inference per batch for
batch sizes 1..15 and K = 5..40 prototypes per layer.

Latency of one batch = host images -> device, the encoder's features F_1..F_4 (the feature
extraction the paper counts in), nearest-prototype distances on every layer, upsampling, averaging,
Gaussian smoothing and image scores, until the results are ready (`block_until_ready`). Each
(batch, K) is the median of --repeats calls after --warmup calls (compilation happens in the
warm-up); the feature extraction alone and the maps alone are timed the same way. The model is the
config's NexViTAD with its adapters and heads at initialization (converted backbones when the
config names them; latency does not depend on the weights' values). The prototypes are fitted with
one `sweep_k` per layer on every train/good image of --category (all of them, so the small tiny-config
layers hold at least K patches; a layer with fewer is capped and the table says so).

    python -m experiments.inference_time --config experiments/configs/tiny.py --out runs/inference_time
    python -m experiments.inference_time --config experiments/configs/paper.py --data PATH/TO/mvtec \\
        --out runs/inference_time-paper --batches 1,5,10,15 --ks 5,10,20,30,40

One run per batch size (so --shard splits them, but latencies are only comparable on one host).
Writes OUT/inference_time.json, .md (median ms per batch x K) and OUT/inference_time.png.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from experiments import protocol
from experiments.sweep import Run, Sweep, main
from nexvitad_jax.errors import UserInputError

DEFAULT_BATCHES = (1, 5, 10, 15)
DEFAULT_KS = (5, 10, 20, 30, 40)


def latency_ms(call: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    """Median (and 10th / 90th percentile) wall milliseconds of `call()` until its outputs are ready."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(call())
        times.append(1e3 * (time.perf_counter() - began))
    return {"median": float(np.median(times)), "p10": float(np.percentile(times, 10)),
            "p90": float(np.percentile(times, 90)), "repeats": repeats}


def execute(workdir: Path, progress: bool, *, config, data: str, category: str | None, batch: int,
            ks: Sequence[int], warmup: int, repeats: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from experiments.cluster_sweep import cap_lines, fit_prototypes
    from nexvitad_jax.data import open_dataset
    from nexvitad_jax.inference import AnomalyDetector
    from nexvitad_jax.inference.anomaly_maps import anomaly_maps
    from nexvitad_jax.pipeline import EncoderFeatureExtractor, resolve_classes
    from nexvitad_jax.train.loop import build_model

    dataset = open_dataset(data, image_size=int(config.image_size))
    classes = resolve_classes(dataset)
    category = category or classes[0]
    if category not in classes:
        raise UserInputError(f"--category {category!r}: not a class of {data}; expected one of {classes}")
    model = build_model(config, 1, 1)
    extractor = EncoderFeatureExtractor(model, kind=str(config.get("bank_features", "interleaved")),
                                        layers=tuple(config.get("bank_layers", (0, 1, 2, 3))))
    normal = dataset.load(category, "train").images.astype(np.float32) / 255.0
    bank = AnomalyDetector(extractor, batch_size=int(config.get("eval_batch_size", 8))).extract(normal)
    prototypes, layers = fit_prototypes(bank, ks, rng=jax.random.key(int(config.seed)),
                                        kmeans_options=dict(config.get("kmeans", {})))
    test = dataset.load(category, "test").images
    images = (test[np.arange(batch) % len(test)].astype(np.float32) / 255.0)
    size = tuple(images.shape[1:3])
    sigma = float(config.get("sigma", 2.0))
    features = extractor(jnp.asarray(images))
    result = {"category": category, "batch": batch, "bank_images": len(normal), "capped": cap_lines(ks, layers),
              "extract_ms": latency_ms(lambda: extractor(jnp.asarray(images)), warmup, repeats), "per_k": {}}
    for k in ks:
        def total(k=k):
            return anomaly_maps(extractor(jnp.asarray(images)), prototypes[k], image_size=size, sigma=sigma)

        maps_only = functools.partial(anomaly_maps, features, prototypes[k], image_size=size, sigma=sigma)
        result["per_k"][str(k)] = {"total_ms": latency_ms(total, warmup, repeats),
                                   "maps_ms": latency_ms(maps_only, warmup, repeats)}
    result["device"] = {"kind": jax.devices()[0].device_kind, "count": jax.device_count(),
                        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}
    return result


def aggregate(records: list[dict]) -> tuple[dict, str]:
    records = sorted(records, key=lambda record: record["params"]["batch"])
    ks = records[0]["params"]["ks"]
    rows = [{"batch": r["params"]["batch"], "extract_ms": r["result"]["extract_ms"]["median"],
             "total_ms": {k: r["result"]["per_k"][str(k)]["total_ms"]["median"] for k in ks},
             "maps_ms": {k: r["result"]["per_k"][str(k)]["maps_ms"]["median"] for k in ks}} for r in records]
    header = "| batch | features only | " + " | ".join(f"K={k}" for k in ks) + " |\n|" + "---|" * (len(ks) + 2) + "\n"
    table = header + "".join(f"| {row['batch']} | {row['extract_ms']:.1f} | "
                             + " | ".join(f"{row['total_ms'][k]:.1f}" for k in ks) + " |\n" for row in rows)
    maps = header.replace("features only", "-") + "".join(
        f"| {row['batch']} | - | " + " | ".join(f"{row['maps_ms'][k]:.2f}" for k in ks) + " |\n" for row in rows)
    capped = sorted({line for r in records for line in r["result"]["capped"]})
    device = records[0]["result"]["device"]
    loads = [r["result"]["device"]["load_average"][0] for r in records]
    markdown = (f"Median latency per batch (ms) on {device['count']} {device['kind']} device(s) "
                f"({device['cpu_count']} CPU cores; 1-minute load average {min(loads):.1f}..{max(loads):.1f} "
                f"during the runs); {records[0]['params']['repeats']} repeats after "
                f"{records[0]['params']['warmup']} warm-up calls. K prototypes per layer"
                + (f", capped where a layer's bank is smaller: {'; '.join(capped)}" if capped else "") + ".\n\n"
                "## Total: features + memory-bank maps and scores (the paper's Fig. 9), ms\n\n" + table
                + "\n## Memory-bank maps and scores alone (features given), ms\n\n" + maps)
    return {"ks": ks, "rows": rows, "capped": capped, "device": device}, markdown


def plot(summary: dict, out: Path) -> list[Path]:
    ks = summary["ks"]
    series = {f"batch {row['batch']}": (ks, [row["total_ms"][k] for k in ks], None) for row in summary["rows"]}
    return [protocol.line_panels([("latency per batch", "median latency (ms)", series)], out / "inference_time.png",
                                 "number of prototypes K per layer", "Fig. 9: memory-bank inference time")]


def build(args: argparse.Namespace) -> Sweep:
    from nexvitad_jax.pipeline import load_config

    config = load_config(args.config, args.overrides)
    ks, batches = protocol.positive_integers(args.ks, "--ks"), protocol.positive_integers(args.batches, "--batches")
    if args.warmup < 1 or args.repeats < 1:
        raise UserInputError(f"--warmup {args.warmup} --repeats {args.repeats}: expected at least 1 each")
    runs = []
    for batch in batches:
        params = {"data": str(args.data), "category": args.category, "batch": batch, "ks": ks,
                  "warmup": args.warmup, "repeats": args.repeats}
        runs.append(Run(f"batch{batch:02d}", params, config,
                        functools.partial(execute, config=config, data=args.data, category=args.category, batch=batch,
                                          ks=ks, warmup=args.warmup, repeats=args.repeats)))
    return Sweep("inference_time", "NexViTAD inference time: memory bank, batch size x K", runs, aggregate, plot)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)),
                        help=f"batch sizes (default {','.join(map(str, DEFAULT_BATCHES))})")
    parser.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)),
                        help=f"prototypes per layer (default {','.join(map(str, DEFAULT_KS))})")
    parser.add_argument("--category", default=None, help="class whose images are used (default: the first)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls; the median is reported (default 20)")


if __name__ == "__main__":
    sys.exit(main(build, sys.argv[1:], __doc__, arguments))
