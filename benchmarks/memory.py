"""Device memory of the paper config's programs on one device, from ahead-of-time compilation.

Every program is lowered on abstract inputs (jax.ShapeDtypeStruct: nothing is allocated or run)
and compiled for the local backend; `compiled.memory_analysis()` gives its argument, output,
aliased (donated), temporary and generated-code bytes. The peak a program needs while it runs is
argument + output - alias + temp. Programs:
- train: the paper config's step (Hiera-Huge + DINOv2-S at 224, random weights, an 11/1 split),
  phases 1 and 2 (phase 2 is the larger), at global batches 13, 26, 52, 104: phase 2 trains
  (C_s + 2 C_t) x p = 13 p images (p images of each of the 11 source classes, p clean and p
  augmented target images) with p = 1, 2, 4, 8 images per class (`train.source_per_class` =
  `train.target_per_class` = p; p = 4 is the paper config); phase 1 the 11 p source images.
- bank: memory-bank inference as `AnomalyDetector.predict` runs it, two programs per batch: the
  trained encoder's features (`EncoderFeatureExtractor`) and `anomaly_maps` (K = 30); the path's
  peak is the larger of the features program and the maps program plus the resident encoder.
- decoder: the "original decoder" baseline (`decoder_baseline.decoder_maps`).
- kmeans: Sinkhorn K-means (the program `sweep_k` runs, k-means++ included) at N = 10^6, D = 1024:
  K = 4096 alone and the sweep K = 8, 16, ..., 4096.
for fp32 and bf16 compute (`model.dtype`; parameters stay fp32) and, where the config has
`model.upconv`, for each of its settings.

    python benchmarks/memory.py        # CPU compilation, ~45 min on 2 cores; benchmarks/results/memory.json
    python benchmarks/memory.py --parts kmeans   # the K-means rows again, the others kept
    python benchmarks/memory.py --table          # the Markdown table of BUILD.md ("Memory on one GPU")
    python benchmarks/memory.py --quick --out /tmp/memory.json   # batch 13 only, fp32, no K sweep

Compiled for XLA:CPU the figures estimate a GPU's: XLA:GPU fuses differently and adds cuDNN and
cuBLAS workspaces (benchmarks/device_check.py records the GPU's own peak bytes of the step it runs).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import unittest.mock
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.train_step import abstract_batch, abstract_state, abstract_trainer  # noqa: E402

SPLIT = (11, 1)
PER_CLASS = (1, 2, 4, 8)  # global batches 13, 26, 52, 104 with the 11/1 split
K = 30
# Usable device memory: the devices' total as nvidia-smi reports it (MiB) and the share XLA may take
# (XLA_PYTHON_CLIENT_MEM_FRACTION=.9, as BUILD.md advises for the paper config; the default is .75).
DEVICES = {"H100 80 GB": 81559 * 2 ** 20, "H200 141 GB": 143771 * 2 ** 20}
MEMORY_FRACTION = 0.9
FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes")


def memory_of(lowered) -> dict:
    """A lowered program compiled: its memory analysis, the peak it implies and the compile time."""
    began = time.perf_counter()
    analysis = lowered.compile().memory_analysis()
    row = {field.removesuffix("_size_in_bytes") + "_bytes": int(getattr(analysis, field)) for field in FIELDS}
    row["peak_bytes"] = row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
    row["compile_s"] = round(time.perf_counter() - began, 1)
    return row


def paper_config(dtype: str, upconv: str | None):
    from nexvitad_jax.configs import paper

    config = paper.get_config()
    config.model.hiera_checkpoint = config.model.dinov2_checkpoint = ""  # random weights: shapes only
    config.model.dtype = dtype
    if upconv is not None:
        config.model.upconv = upconv
    return config


def upconv_settings() -> list[str | None]:
    """The config's `model.upconv` settings to measure (None where the config has no such field)."""
    from nexvitad_jax.configs import paper

    return ["width", "keep"] if "upconv" in paper.get_config().model else [None]


def train_rows(config, per_class: int) -> list[dict]:
    """The train step of both phases at p = per_class images per class."""
    config.train.source_per_class = config.train.target_per_class = per_class
    trainer = abstract_trainer(config, *SPLIT)
    state = abstract_state(trainer)
    rows = []
    for phase in (1, 2):
        batch = abstract_batch(config, trainer, phase)
        images = SPLIT[0] * per_class + (2 * SPLIT[1] * per_class if phase == 2 else 0)
        rows.append({"program": f"train phase {phase}", "per_class": per_class, "images": images,
                     "batch_rows": int(batch["images"].shape[0]),
                     **memory_of(trainer._step[phase].lower(state, trainer.frozen, batch))})
    return rows


def abstract_model(config):
    from flax import nnx

    from nexvitad_jax.models.build import build_model

    return nnx.eval_shape(lambda: build_model(config, *SPLIT))


def inference_rows(config, batch: int) -> list[dict]:
    """Memory-bank inference (features, then maps) and the decoder baseline on `batch` images."""
    import jax
    import jax.numpy as jnp

    from nexvitad_jax.inference import DecoderBaseline, EncoderFeatureExtractor
    from nexvitad_jax.inference.anomaly_maps import anomaly_maps

    model = abstract_model(config)
    size = int(config.data.image_size)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    # Made from abstract weights: nothing to fingerprint or place on a device.
    with unittest.mock.patch("nexvitad_jax.inference.extractors.weights_fingerprint", lambda state: "abstract"), \
            unittest.mock.patch("jax.device_put", lambda x, *args, **kwargs: x):
        extractor = EncoderFeatureExtractor.from_config(model, config.bank)
        baseline = DecoderBaseline(model)
    features = jax.eval_shape(extractor._features, extractor._state, images)
    prototypes = [jax.ShapeDtypeStruct((K, f.shape[-1]), jnp.float32) for f in features]
    encoder_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(extractor._state))
    feature_row = memory_of(extractor._pipeline.lower(extractor._state, images))
    maps = functools.partial(anomaly_maps, image_size=(size, size), sigma=float(config.bank.sigma))
    maps_row = memory_of(jax.jit(maps).lower(features, prototypes))
    path_peak = max(feature_row["peak_bytes"], maps_row["peak_bytes"] + encoder_bytes)
    decoder_row = memory_of(baseline._maps.lower(baseline._state, images, 0))
    return [{"program": "bank features", "images": batch, **feature_row},
            {"program": "bank maps", "images": batch, "k": K, **maps_row},
            {"program": "bank path", "images": batch, "k": K, "resident_encoder_bytes": encoder_bytes,
             "peak_bytes": path_peak},
            {"program": "decoder", "images": batch, **decoder_row}]


def kmeans_rows(n: int = 1_000_000, d: int = 1024) -> list[dict]:
    """The program `sweep_k` (and `sinkhorn_kmeans`) runs, k-means++ included, on an (n, d) bank."""
    import jax
    import jax.numpy as jnp

    from nexvitad_jax.inference import SolverOptions
    from nexvitad_jax.inference.sinkhorn_kmeans import _seeded_fit

    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    rows = []
    for ks in ((4096,), tuple(2 ** p for p in range(3, 13))):
        lowered = _seeded_fit.lower(x, key, scalar, scalar, 100, ks=ks, options=SolverOptions())
        rows.append({"program": "kmeans", "n": n, "d": d, "ks": list(ks), **memory_of(lowered)})
    return rows


def fits(peak_bytes: int) -> dict[str, bool]:
    return {device: peak_bytes <= MEMORY_FRACTION * total for device, total in DEVICES.items()}


def global_batch(row: dict) -> int:
    """The global batch a row belongs to: 13 p for the train step (p images per class), else its images."""
    return row["per_class"] * (SPLIT[0] + 2 * SPLIT[1]) if "per_class" in row else row["images"]


def largest_fitting(rows: list[dict], program: str) -> dict[str, int | None]:
    """Per device, the largest global batch of `program` whose peak fits."""
    return {device: max((global_batch(row) for row in rows if row["program"] == program and row["fits"][device]),
                        default=None) for device in DEVICES}


def measure_variant(dtype: str, upconv: str | None, per_class: tuple[int, ...], record) -> list[dict]:
    """Every train and inference program of one (dtype, upconv) variant; `record(rows)` after each."""
    config = paper_config(dtype, upconv)
    rows: list[dict] = []
    for p in per_class:
        rows += train_rows(config, p)
        record(rows)
        rows += inference_rows(config, (SPLIT[0] + 2 * SPLIT[1]) * p)
        record(rows)
    for row in rows:
        row["fits"] = fits(row["peak_bytes"])
    return rows


def markdown_table(report: dict) -> str:
    """BUILD.md's table: peak GiB per program, variant and global batch; the largest batch that fits."""
    gib = lambda value: f"{value / 2 ** 30:.1f}"
    batches = [p * (SPLIT[0] + 2 * SPLIT[1]) for p in PER_CLASS]
    lines = ["| program | compute, upconv | " + " | ".join(f"B = {b}" for b in batches)
             + " | largest B fitting " + " / ".join(DEVICES) + " |", "|---|---|" + "---|" * (len(batches) + 1)]
    for program in ("train phase 2", "train phase 1", "bank path", "decoder"):
        for name, variant in report["variants"].items():
            rows = {global_batch(row): row for row in variant["rows"] if row["program"] == program}
            cells = [gib(rows[b]["peak_bytes"]) if b in rows else "-" for b in batches]
            fitting = largest_fitting(variant["rows"], program) if all("fits" in r for r in rows.values()) else {}
            lines.append(f"| {program} | {name} | " + " | ".join(cells) + " | "
                         + " / ".join("none" if f is None else str(f) for f in fitting.values()) + " |")
    for row in report.get("kmeans", []):
        ks = f"K = {row['ks'][0]}" + (f"..{row['ks'][-1]} (sweep)" if len(row["ks"]) > 1 else "")
        lines.append(f"| Sinkhorn K-means, N = {row['n']:,}, D = {row['d']}, {ks} | float32 | {gib(row['peak_bytes'])}"
                     + " | -" * (len(batches) - 1) + " | "
                     + " / ".join("fits" if ok else "no" for ok in row["fits"].values()) + " |")
    return "\n".join(lines) + "\n"


def measure_models(dtypes: list[str], per_class: tuple[int, ...], report: dict, write) -> None:
    """Every (upconv, dtype) variant's programs into report["variants"], written as they come."""
    for upconv in upconv_settings():
        for dtype in dtypes:
            name = dtype if upconv is None else f"{dtype} upconv={upconv}"
            variant = report["variants"].setdefault(name, {"dtype": dtype, "upconv": upconv})

            def record(rows, variant=variant):
                variant["rows"] = rows
                write()

            rows = measure_variant(dtype, upconv, per_class, record)
            variant["largest_fitting"] = {program: largest_fitting(rows, program)
                                          for program in ("train phase 2", "bank path", "decoder")}
            record(rows)
            print(f"{name}: {variant['largest_fitting']}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="global batch 13, fp32, no K-means: a smoke run")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--parts", default="models,kmeans",
                        help="models and/or kmeans; a part left out keeps its entries of --out")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "memory.json")
    parser.add_argument("--table", action="store_true", help="print BUILD.md's Markdown table of --out and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())), end="")
        return 0
    import jax

    parts = {"models"} if args.quick else set(args.parts.split(","))
    previous = json.loads(args.out.read_text()) if args.out.is_file() and not args.quick else {}
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    commands = previous.get("commands", {"models": previous["command"]} if "command" in previous else {})
    report = {"commands": commands | {part: command for part in parts},
              "backend": jax.default_backend(), "jax": jax.__version__, "platform": platform.platform(),
              "cpu_cores": len(os.sched_getaffinity(0)), "split": "11/1", "image_size": 224,
              "devices_bytes": DEVICES, "memory_fraction": MEMORY_FRACTION,
              "peak": "argument + output - alias + temp", "variants": {}}
    if "models" not in parts and "variants" in previous:  # a part not measured keeps its figures
        report["variants"] = previous["variants"]
    if "kmeans" not in parts and "kmeans" in previous:
        report["kmeans"] = previous["kmeans"]

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    if "models" in parts:
        measure_models(["float32"] if args.quick else args.dtypes.split(","),
                       PER_CLASS[:1] if args.quick else PER_CLASS, report, write)
    if "kmeans" in parts:
        report["kmeans"] = [row | {"fits": fits(row["peak_bytes"])} for row in kmeans_rows()]
        write()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
