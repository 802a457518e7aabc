"""The paper's cluster-count ablation (Fig. 8): memory-bank metrics for K = 5, 10, 20, 30, 40 and
beyond, on the model trained per split and seed.

Per target class, `fit_memory_banks` fits every K with ONE compiled `sweep_k` per layer (its run
for K equals `sinkhorn_kmeans` with that K; the rng is the main job's, so the config's K reproduces
the main job's memory bank); each batch of test images is extracted once and scored against each
K's prototypes. Like the main job, a run spreads its images over every device it sees (and
`--devices-per-run` runs several runs at once, each on its own devices). A layer's bank holds
M x h_n x w_n patch features: a K above that count is capped to it on that layer (the bank then
keeps every patch as a prototype), and the tables list every cap.
At the tiny config (64 px, M = 4) the layers hold 1024, 256, 64 and 16 patches.

    python -m experiments.cluster_sweep --config tiny --out runs/cluster_sweep
    python -m experiments.cluster_sweep --config paper --data PATH/TO/mvtec \\
        --out runs/cluster_sweep-paper --ks 5,10,20,30,40,64,128 --shard 0/2   # then --aggregate-only
    python -m experiments.cluster_sweep --config paper --data PATH/TO/mvtec \
        --out runs/cluster_sweep-paper --ks 5,10,20,30,40,64,128 --devices-per-run 1   # 8 runs at once on 8 GPUs

Writes OUT/cluster_sweep.json, .md and OUT/cluster_sweep.png (metric vs K, one line per split).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import protocol
from experiments.runner import Experiment, main

DEFAULT_KS = (5, 10, 20, 30, 40, 64, 128)
BY = ("split", "k")


def layer_report(bank_features: Sequence, banks: dict, ks: Sequence[int]) -> list[dict]:
    """Per layer: its patch count, the K each requested K became there (capped at the patch
    count), convergence and objective of each fit."""
    layers = []
    for layer, features in enumerate(bank_features):
        layers.append({"patches": int(np.prod(features.shape[:3])),
                       "effective_k": [int(banks[k].prototypes[layer].shape[0]) for k in ks],
                       "converged": [bool(banks[k].results[layer].converged) for k in ks],
                       "objective": [float(banks[k].results[layer].objective) for k in ks]})
    return layers


def fit_banks(extractor, normal: np.ndarray, ks: Sequence[int], *, config, seed: int) -> tuple[dict, list[dict]]:
    """The memory banks of every K from the normal images (uint8), their features extracted over the
    extractor's mesh: {K: MemoryBank}, layer report. The rng is the main job's, so the config's K
    reproduces the main job's memory bank."""
    import jax

    from nexvitad_jax.inference import fit_memory_banks
    from nexvitad_jax.inference.batching import map_batches

    features = map_batches(extractor, normal.astype(np.float32) / 255.0, int(config.eval.batch_size), extractor.mesh,
                           to_host=False)
    banks = fit_memory_banks(features, ks, rng=jax.random.key(seed), cap_to_bank=True, **config.bank.kmeans.to_dict())
    return banks, layer_report(features, banks, ks)


def cap_lines(ks: Sequence[int], layers: Sequence[dict]) -> list[str]:
    """'K=20: layer 3 (16 patches) -> 16' for every K capped on a layer."""
    return [f"K={k}: layer {layer} ({info['patches']} patches) -> {effective}"
            for layer, info in enumerate(layers) for k, effective in zip(ks, info["effective_k"]) if effective < k]


def sweep_class(extractor, config, dataset, category: str, seed: int, ks: Sequence[int]) -> dict[str, Any]:
    """Metrics of one target class for every K."""
    from nexvitad_jax.data import few_shot_images
    from nexvitad_jax.inference.anomaly_maps import anomaly_maps
    from nexvitad_jax.inference.batching import map_batches, replicate
    from nexvitad_jax.metrics import evaluate_maps

    normal = few_shot_images(dataset, category, int(config.data.few_shot), seed)
    banks, layers = fit_banks(extractor, normal, ks, config=config, seed=seed)
    test = dataset.load(category, "test")
    prototypes = replicate({str(k): banks[k].prototypes for k in ks}, extractor.mesh)
    size, sigma = tuple(test.images.shape[1:3]), float(config.bank.sigma)

    def maps_of(batch):  # a batch's features once, scored against every K's prototypes
        features = extractor(batch)
        return {k: anomaly_maps(features, layers_k, image_size=size, sigma=sigma) for k, layers_k in prototypes.items()}

    maps = map_batches(maps_of, test.images.astype(np.float32) / 255.0, int(config.eval.batch_size), extractor.mesh)
    per_k = {k: evaluate_maps(maps[k][0], test.masks, maps[k][1], test.labels) for k in prototypes}
    return {"per_k": per_k, "layers": layers}


def execute(workdir: Path, progress: bool, *, config, data: str, split: str, seed: int,
            ks: Sequence[int], target_data: str | None = None) -> dict[str, Any]:
    from nexvitad_jax.data import open_dataset, split_classes
    from nexvitad_jax.inference import EncoderFeatureExtractor
    from nexvitad_jax.io import atomic_write
    from nexvitad_jax.metrics import mean_metrics
    from nexvitad_jax.run import check_data
    from nexvitad_jax.train import train

    dataset = open_dataset(data, image_size=int(config.data.image_size), target_spec=target_data)
    source, target = split_classes(dataset, split, None, seed)
    check_data(dataset, source, target)  # every image and mask it reads, before training
    trained = train(config, dataset, source, target, workdir / "train", progress=progress)
    extractor = EncoderFeatureExtractor.from_config(trained.model, config.bank)
    per_class = {}
    for category in target:  # per-class results resume like the main job's
        path = workdir / "classes" / f"{category}.json"
        if not path.is_file():
            atomic_write(path, json.dumps(sweep_class(extractor, config, dataset, category, seed, ks), indent=1) + "\n")
        per_class[category] = json.loads(path.read_text())
    mean = {str(k): mean_metrics([per_class[c]["per_k"][str(k)] for c in target]) for k in ks}
    return {"source": source, "target": target, "ks": list(ks), "per_class": per_class, "mean": mean}


def caps(records: Sequence[dict]) -> list[str]:
    """Every distinct cap of the runs' layer banks, once."""
    return list(dict.fromkeys(line for record in records for classes in record["result"]["per_class"].values()
                              for line in cap_lines(record["result"]["ks"], classes["layers"])))


def aggregate(records: list[dict]) -> tuple[dict, str]:
    rows = [{"split": record["params"]["split"], "seed": record["params"]["seed"], "k": int(k), **metrics}
            for record in records for k, metrics in record["result"]["mean"].items()]
    groups = protocol.summarize(rows, BY)
    capped = caps(records)
    note = ("K above a layer's patch count is capped to it on that layer (every patch a prototype): "
            + ("; ".join(capped) if capped else "no layer was capped") + ".\n\n")
    return ({"by": list(BY), "groups": groups, "capped": capped},
            protocol.random_backbone_note(records) + note + protocol.summary_markdown(groups, BY))


def plot(summary: dict, out: Path) -> list[Path]:
    panels = [(title, f"{title} (%)", protocol.metric_series(summary["groups"], "split", "k", metric))
              for metric, title in protocol.PLOT_METRICS]
    return [protocol.line_panels(panels, out / "cluster_sweep.png", "number of clusters K",
                                 "Fig. 8: memory-bank metrics vs K (mean ± std over seeds)")]


def build(args: argparse.Namespace) -> Experiment:
    ks = protocol.positive_integers(args.ks, "--ks")
    return Experiment("cluster_sweep", "NexViTAD ablation: number of clusters K (memory bank)",
                 protocol.protocol_runs(args, {"": {}}, execute, ks=ks), aggregate, plot)


def arguments(parser: argparse.ArgumentParser) -> None:
    protocol.protocol_arguments(parser)
    parser.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)),
                        help=f"cluster counts (default {','.join(map(str, DEFAULT_KS))})")


if __name__ == "__main__":
    sys.exit(main(build, sys.argv[1:], __doc__, arguments))
