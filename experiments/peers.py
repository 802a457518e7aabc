"""The peer methods in NexViTAD's harness (`nexvitad_jax.peers`): PatchEAD and PatchEAD+ few-shot
and batch zero-shot, INP-Former few-shot, and NexViTAD's memory bank, on the same few-shot images (per class
`sorted(train/good)[seed*N:(seed+1)*N]`), the same devices and the same evaluators; the
paper-style table (image AUROC / AP, pixel AUROC / AUPRO, mean ± std over seeds) and each method's
throughput (test images per second of scoring).

    python -m experiments.peers --config tiny --out runs/peers
    python -m experiments.peers --data PATH/TO/mvtec --methods patchead,patchead_plus,inp_former \
        --shots 1,2,4 --seeds 3 --out runs/peers-demo
    python -m experiments.peers --config paper --data PATH/TO/mvtec --dino checkpoints/dinov2-base-reg \\
        --resolution 448 --methods patchead,patchead_plus,patchead_zero,nexvitad_bank --shots 1,2,4 \\
        --seeds 3 --out runs/peers-mvtec --shard 0/2                 # host 1: --shard 1/2

One run per (method, shots, seed) (zero-shot methods: shots 0), its result in
OUT/runs/NAME/result.json, written atomically and skipped when present (resume); per class within a
run, OUT/runs/NAME/work/classes/CLASS.json (INP-Former's training checkpoints: work/train/CLASS). Writes OUT/peers.json, OUT/peers.md and OUT/peers.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import protocol
from experiments.runner import Experiment, Run, main

BY = ("method", "shots")
# (metric, title): the PatchEAD paper's table columns, then the rest the evaluators give.
TABLE = (("image_auroc", "image AUROC"), ("image_ap", "image AP"), ("pixel_auroc", "pixel AUROC"),
         ("aupro", "AUPRO@0.3"), ("pixel_ap", "pixel AP"), ("pro_iou", "PRO-IoU"))
DEFAULT_METHODS = ("patchead", "patchead_plus", "patchead_zero", "nexvitad_bank")


def evaluate_class(scorer, dataset, category: str, shots: int, seed: int, workdir: Path) -> dict[str, Any]:
    """One class: the method's maps on its test split, every metric, the scoring time and the time
    with the fit (prompt features, memory bank or training)."""
    from nexvitad_jax.data import few_shot_images
    from nexvitad_jax.errors import UserInputError
    from nexvitad_jax.metrics import evaluate_maps, image_ap

    test = dataset.load(category, "test")
    prompts = few_shot_images(dataset, category, shots, seed).astype(np.float32) / 255.0 if shots else None
    began = time.perf_counter()
    maps, scores, seconds = scorer(prompts, test.images.astype(np.float32) / 255.0, seed, workdir)
    total = time.perf_counter() - began
    metrics = evaluate_maps(np.asarray(maps), test.masks, np.asarray(scores), test.labels, mask_known=test.mask_known,
                            reason=test.unmasked_reason())
    try:
        metrics["image_ap"] = image_ap(np.asarray(scores), test.labels)
    except UserInputError as error:
        metrics["image_ap"] = None
        metrics.setdefault("undefined", {})["image_ap"] = str(error)
    return {"metrics": metrics, "images": len(test), "seconds": seconds, "seconds_with_fit": total}


def execute(workdir: Path, progress: bool, *, config, data: str, method: str, shots: int, seed: int,
            classes: Sequence[str] | None, dino: str | None, resolution: int | None,
            inp_steps: int = 200) -> dict[str, Any]:
    from nexvitad_jax.data import open_dataset
    from nexvitad_jax.io import atomic_write
    from nexvitad_jax.metrics import mean_metrics
    from nexvitad_jax.peers.methods import method_named

    dataset = open_dataset(data, image_size=int(config.data.image_size))
    chosen = list(classes) if classes else sorted(dataset.classes)
    scorer = method_named(method).build(config, dino=dino, resolution=resolution, inp_steps=inp_steps)
    per_class = {}
    for category in chosen:  # per-class results resume within a run
        path = workdir / "classes" / f"{category}.json"
        if not path.is_file():
            result = evaluate_class(scorer, dataset, category, shots, seed, workdir / "train" / category)
            atomic_write(path, json.dumps(result, indent=1) + "\n")
        per_class[category] = json.loads(path.read_text())
    return {"classes": chosen, "per_class": per_class, "mean": mean_metrics([per_class[c]["metrics"] for c in chosen]),
            "throughput": throughput([per_class[c] for c in chosen])}


def throughput(rows: Sequence[dict]) -> dict[str, float | None]:
    """Test images per second of scoring: over every class (the first compiles the programs) and
    over the classes after the first (warm; None with one class)."""
    def rate(part):
        seconds = sum(r["seconds"] for r in part)
        return sum(r["images"] for r in part) / seconds if part and seconds > 0 else None

    return {"images_per_s": rate(rows), "images_per_s_warm": rate(rows[1:])}


def build_runs(args: argparse.Namespace) -> list[Run]:
    from nexvitad_jax.config import load_config, with_changes
    from nexvitad_jax.errors import UserInputError
    from nexvitad_jax.peers.methods import method_named

    methods = [method_named(name.strip()) for name in args.methods.split(",") if name.strip()]
    if not methods:
        raise UserInputError(f"--methods {args.methods!r}: expected at least one peer method")
    shots = protocol.positive_integers(args.shots, "--shots")
    if args.seeds < 1:
        raise UserInputError(f"--seeds {args.seeds}: expected a positive number of seeds")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    base = load_config(args.config, args.overrides)
    runs = []
    for method in methods:
        for n in (shots if method.few_shot else [0]):
            for seed in range(args.seeds):
                config = with_changes(base, {"seed": seed})
                params = {"data": str(args.data), "method": method.name, "shots": n, "seed": seed,
                          "classes": classes, "dino": args.dino, "resolution": args.resolution}
                if method.name.startswith("inp_former"):
                    params["inp_steps"] = args.inp_steps
                execute_run = functools.partial(execute, config=config, data=args.data, method=method.name,
                                                shots=n, seed=seed, classes=classes, dino=args.dino,
                                                resolution=args.resolution, inp_steps=args.inp_steps)
                runs.append(Run(f"{method.name}_{n}shot_seed{seed}", params, config, execute_run))
    return runs


def rows_of(records: Sequence[dict]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        params, result = record["params"], record["result"]
        rows.append({"method": params["method"], "shots": params["shots"], "seed": params["seed"], **result["mean"],
                     **result["throughput"]})
    return rows


def table_markdown(groups: Sequence[dict]) -> str:
    from nexvitad_jax.peers.methods import METHODS

    headers = ["method", "shots", "seeds", *(title for _, title in TABLE), "images/s (warm)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for group in groups:
        title = METHODS[group["method"]].title if group["method"] in METHODS else group["method"]
        rate = group["metrics"]["images_per_s_warm"]["mean"] or group["metrics"]["images_per_s"]["mean"]
        cells = [title, str(group["shots"]) if group["shots"] else "batch 0-shot", str(len(group["seeds"])),
                 *(protocol.mean_std(group["metrics"][name]) for name, _ in TABLE),
                 "n/a" if rate is None else f"{rate:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def aggregate(records: list[dict]) -> tuple[dict, str]:
    metrics = [name for name, _ in TABLE] + ["images_per_s", "images_per_s_warm"]
    groups = protocol.summarize(rows_of(records), BY, metrics)
    note = ("Per (method, shots): the mean over classes of each run, then mean ± std over seeds (%); images/s: "
            "test images per second of scoring (the fit or training excluded) on this run's devices, after the "
            "first class (which compiles).\n\n")
    return {"by": list(BY), "groups": groups}, random_backbone_note(records) + note + table_markdown(groups)


def random_backbone_note(records: Sequence[dict]) -> str:
    """The warning of random weights, where a run used them: a PatchEAD run without --dino, a memory
    bank run without converted checkpoints in its config."""
    from nexvitad_jax.config import uses_random_backbones

    def random(record):
        if record["params"]["method"] == "nexvitad_bank":
            return uses_random_backbones(record["config"])
        return not record["params"]["dino"]

    return "" if not any(map(random, records)) else (
        "These runs use RANDOMLY INITIALIZED backbones (no pretrained weights): the figures check the pipeline, "
        "they are not the papers' accuracy.\n\n")


def plot(summary: dict, out: Path) -> list[Path]:
    from nexvitad_jax.peers.methods import METHODS

    label = lambda method: METHODS[method].title if method in METHODS else method
    panels = [(title, f"{title} (%)", protocol.metric_series(summary["groups"], "method", "shots", metric, label))
              for metric, title in TABLE[:4]]
    return [protocol.line_panels(panels, out / "peers.png", "normal prompt images (0: batch zero-shot)",
                                 "Peer methods: mean ± std over seeds")]


def build(args: argparse.Namespace) -> Experiment:
    return Experiment("peers", "Peer methods in the NexViTAD harness (few-shot and batch zero-shot)", build_runs(args),
                      aggregate, plot)


def arguments(parser: argparse.ArgumentParser) -> None:
    from nexvitad_jax.peers.methods import METHODS

    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--shots", default="1,2,4", help="normal prompt images per class (default 1,2,4)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1: the few-shot images, zero-shot batches")
    parser.add_argument("--classes", default=None, help="comma-separated classes (default: every class of --data)")
    parser.add_argument("--dino", default=None, metavar="DIR",
                        help="a converted DINOv2 for the PatchEAD methods (default: random from config.model.dinov2)")
    parser.add_argument("--inp-steps", type=int, default=200,
                        help="INP-Former training steps per class (default 200)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="the DINOv2 input size, a multiple of 14 (default: data.image_size rounded down; "
                             "the PatchEAD paper uses 448)")


if __name__ == "__main__":
    sys.exit(main(build, sys.argv[1:], __doc__, arguments))
