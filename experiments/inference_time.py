"""The paper's inference-time comparison (Fig. 9): latency of memory-bank inference per batch for
batch sizes 1..15 and K = 5..40 prototypes per layer.

Latency of one batch = host images -> devices (spread over every device the run sees, the batch
padded to a multiple of their count as in all inference), the encoder's features F_1..F_4 (the feature
extraction the paper counts in), nearest-prototype distances on every layer, upsampling, averaging,
Gaussian smoothing and image scores, until the results are ready (`block_until_ready`). Each
(batch, K) is the median of --repeats calls after --warmup calls (compilation happens in the
warm-up), the K values taking turns within each repeat; the feature extraction alone and the maps
alone are timed the same way. The model is the
config's NexViTAD with its adapters and heads at initialization (converted backbones when the
config names them; latency does not depend on the weights' values). The prototypes are fitted with
one `sweep_k` per layer on every train/good image of --category (all of them, so the small tiny-config
layers hold at least K patches; a layer with fewer is capped and the table says so).
With --target-data, --category is a class of the target data (the images timed are its own).

    python -m experiments.inference_time --config tiny --out runs/inference_time
    python -m experiments.inference_time --config paper --data PATH/TO/mvtec \\
        --out runs/inference_time-paper --batches 1,5,10,15 --ks 5,10,20,30,40

One run per batch size (so --shard splits them, but latencies are only comparable on one host, and
runs at once with --devices-per-run would disturb each other's timings: leave it off).
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
from experiments.runner import Experiment, Run, main
from nexvitad_jax.errors import UserInputError

DEFAULT_BATCHES = (1, 5, 10, 15)
DEFAULT_KS = (5, 10, 20, 30, 40)


def latencies_ms(calls: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per named call: median (and 10th / 90th percentile) wall milliseconds until its outputs are
    ready. The calls take turns within each repeat, so a load change on a shared machine hits them
    all alike instead of whichever was being timed."""
    import jax

    for _ in range(warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            began = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(1e3 * (time.perf_counter() - began))
    return {name: {"median": float(np.median(t)), "p10": float(np.percentile(t, 10)),
                   "p90": float(np.percentile(t, 90)), "repeats": repeats} for name, t in times.items()}


def execute(workdir: Path, progress: bool, *, config, data: str, category: str | None, batch: int,
            ks: Sequence[int], warmup: int, repeats: int, target_data: str | None = None) -> dict[str, Any]:
    import jax

    from experiments.cluster_sweep import cap_lines, fit_banks
    from nexvitad_jax.data import open_dataset, protocol_classes
    from nexvitad_jax.inference import EncoderFeatureExtractor
    from nexvitad_jax.inference.anomaly_maps import anomaly_maps
    from nexvitad_jax.inference.batching import global_batch_size, padded_batches, replicate
    from nexvitad_jax.models.build import build_model
    from nexvitad_jax.run import check_data

    # With --target-data the images are a target class's (the target data's names, as --target takes them).
    dataset = open_dataset(target_data or data, image_size=int(config.data.image_size))
    classes = protocol_classes(dataset.classes)
    category = category or classes[0]
    if category not in classes:
        raise UserInputError(f"--category {category!r}: not a class of {target_data or data}; expected one of "
                             f"{classes}")
    check_data(dataset, [], [category])  # its images and masks, before anything is compiled
    model = build_model(config, 1, 1)
    extractor = EncoderFeatureExtractor.from_config(model, config.bank)
    normal = dataset.load(category, "train").images
    banks, layers = fit_banks(extractor, normal, ks, config=config, seed=int(config.seed))
    prototypes = replicate({k: banks[k].prototypes for k in ks}, extractor.mesh)
    test = dataset.load(category, "test").images
    images = (test[np.arange(batch) % len(test)].astype(np.float32) / 255.0)
    size = tuple(images.shape[1:3])
    sigma = float(config.bank.sigma)

    def placed():  # the batch's host images onto the devices, spread over them
        return next(padded_batches(images, batch, extractor.mesh))[1]

    features = extractor(placed())
    calls = {"extract": lambda: extractor(placed())}
    for k in ks:
        calls[f"total {k}"] = lambda k=k: anomaly_maps(extractor(placed()), prototypes[k], image_size=size, sigma=sigma)
        calls[f"maps {k}"] = functools.partial(anomaly_maps, features, prototypes[k], image_size=size, sigma=sigma)
    timings = latencies_ms(calls, warmup, repeats)
    result = {"category": category, "batch": batch, "rows_per_batch": global_batch_size(batch, extractor.mesh),
              "bank_images": len(normal), "capped": cap_lines(ks, layers), "extract_ms": timings["extract"],
              "per_k": {str(k): {"total_ms": timings[f"total {k}"], "maps_ms": timings[f"maps {k}"]} for k in ks}}
    result["device"] = {"kind": jax.devices()[0].device_kind, "count": jax.device_count(),
                        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}
    return result


def _grid(records: Sequence[dict], ks: Sequence[int], cell) -> str:
    """Markdown: one row per batch size, features-only then one column per K; `cell(result, k)` with
    k None for the features-only column."""
    lines = ["| batch | features only | " + " | ".join(f"K={k}" for k in ks) + " |", "|" + "---|" * (len(ks) + 2)]
    for record in records:
        cells = [cell(record["result"], None)] + [cell(record["result"], str(k)) for k in ks]
        lines.append(f"| {record['params']['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def aggregate(records: list[dict]) -> tuple[dict, str]:
    records = sorted(records, key=lambda record: record["params"]["batch"])
    ks = records[0]["params"]["ks"]

    def total(statistic):
        return lambda result, k: f"{(result['extract_ms'] if k is None else result['per_k'][k]['total_ms'])[statistic]:.1f}"

    def maps(result, k):
        return "-" if k is None else f"{result['per_k'][k]['maps_ms']['median']:.2f}"

    rows = [{"batch": r["params"]["batch"], "extract_ms": r["result"]["extract_ms"]["median"],
             "total_ms": {k: r["result"]["per_k"][str(k)]["total_ms"]["median"] for k in ks},
             "maps_ms": {k: r["result"]["per_k"][str(k)]["maps_ms"]["median"] for k in ks}} for r in records]
    capped = sorted({line for r in records for line in r["result"]["capped"]})
    device = records[0]["result"]["device"]
    loads = [r["result"]["device"]["load_average"][0] for r in records]
    markdown = (f"Latency per batch (ms) on {device['count']} {device['kind']} device(s) "
                f"({device['cpu_count']} CPU cores; 1-minute load average {min(loads):.1f}..{max(loads):.1f} "
                f"at the end of the runs); {records[0]['params']['repeats']} repeats after "
                f"{records[0]['params']['warmup']} warm-up calls. K prototypes per layer"
                + (f", capped where a layer's bank is smaller: {'; '.join(capped)}" if capped else "") + ".\n\n"
                "## Total: features + memory-bank maps and scores (the paper's Fig. 9), median, ms\n\n"
                + _grid(records, ks, total("median"))
                + "\n## Total, 10th percentile (less exposed to other load on the machine), ms\n\n"
                + _grid(records, ks, total("p10"))
                + "\n## Memory-bank maps and scores alone (features given), median, ms\n\n" + _grid(records, ks, maps))
    return {"ks": ks, "rows": rows, "capped": capped, "device": device}, markdown


def plot(summary: dict, out: Path) -> list[Path]:
    ks = summary["ks"]
    series = {f"batch {row['batch']}": (ks, [row["total_ms"][k] for k in ks], None) for row in summary["rows"]}
    return [protocol.line_panels([("latency per batch", "median latency (ms)", series)], out / "inference_time.png",
                                 "number of prototypes K per layer", "Fig. 9: memory-bank inference time")]


def build(args: argparse.Namespace) -> Experiment:
    from nexvitad_jax.config import load_config

    config = load_config(args.config, args.overrides)
    ks, batches = protocol.positive_integers(args.ks, "--ks"), protocol.positive_integers(args.batches, "--batches")
    if args.warmup < 1 or args.repeats < 1:
        raise UserInputError(f"--warmup {args.warmup} --repeats {args.repeats}: expected at least 1 each")
    runs = []
    for batch in batches:
        params = {"data": str(args.data), "category": args.category, "batch": batch, "ks": ks,
                  "warmup": args.warmup, "repeats": args.repeats, **protocol.data_options(args)}
        runs.append(Run(f"batch{batch:02d}", params, config,
                        functools.partial(execute, config=config, data=args.data, category=args.category, batch=batch,
                                          ks=ks, warmup=args.warmup, repeats=args.repeats,
                                          **protocol.data_options(args))))
    return Experiment("inference_time", "NexViTAD inference time: memory bank, batch size x K", runs, aggregate, plot)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)),
                        help=f"batch sizes (default {','.join(map(str, DEFAULT_BATCHES))})")
    parser.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)),
                        help=f"prototypes per layer (default {','.join(map(str, DEFAULT_KS))})")
    parser.add_argument("--category", default=None, help="class whose images are used (default: the first)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls; the median is reported (default 50)")


if __name__ == "__main__":
    sys.exit(main(build, sys.argv[1:], __doc__, arguments))
