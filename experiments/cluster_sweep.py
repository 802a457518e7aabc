"""The paper's cluster-count ablation (Fig. 8): memory-bank metrics for K = 5, 10, 20, 30, 40 and
beyond, on the model trained per split and seed.

Per target class and layer, ONE compiled `sweep_k` fits every K on that layer's bank (its run for K
equals `sinkhorn_kmeans` with that K; the rng is the main job's, so the config's K reproduces the
main job's memory bank); the test features are extracted once and scored against each K's
prototypes. A layer's bank holds M x h_n x w_n patch features: a K above that count is capped to
it on that layer (the bank then keeps every patch as a prototype), and the tables list every cap.
At the tiny config (64 px, M = 4) the layers hold 1024, 256, 64 and 16 patches.

    python -m experiments.cluster_sweep --config experiments/configs/tiny.py --out runs/cluster_sweep
    python -m experiments.cluster_sweep --config experiments/configs/paper.py --data PATH/TO/mvtec \\
        --out runs/cluster_sweep-paper --ks 5,10,20,30,40,64,128 --shard 0/2   # then --aggregate-only

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
from experiments.sweep import Sweep, main

DEFAULT_KS = (5, 10, 20, 30, 40, 64, 128)
BY = ("split", "k")


def capped_ks(ks: Sequence[int], patches: int) -> list[int]:
    """The K each requested K becomes on a bank of `patches` points: min(K, patches)."""
    return [min(int(k), int(patches)) for k in ks]


def score_batches(features: Sequence, prototypes: Sequence, image_size: tuple[int, int], sigma: float,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps of pre-extracted features in fixed-size batches (the last one padded: one
    compiled program per K)."""
    import jax.numpy as jnp

    from nexvitad_jax.inference.anomaly_maps import anomaly_maps

    maps, scores = [], []
    for start in range(0, features[0].shape[0], batch_size):
        batch = [f[start:start + batch_size] for f in features]
        count = batch[0].shape[0]
        padded = [jnp.concatenate([b, jnp.repeat(b[-1:], batch_size - count, 0)]) for b in batch]
        batch_maps, batch_scores = anomaly_maps(padded, list(prototypes), image_size=image_size, sigma=sigma)
        maps.append(np.asarray(batch_maps[:count]))
        scores.append(np.asarray(batch_scores[:count]))
    return np.concatenate(maps), np.concatenate(scores)


def fit_prototypes(bank: Sequence, ks: Sequence[int], *, rng, kmeans_options: dict) -> tuple[dict, list[dict]]:
    """Per layer bank (M, h, w, D) ONE `sweep_k` over the distinct capped Ks, layer n with
    fold_in(rng, n) as `AnomalyDetector.fit` does -> ({K: prototypes per layer}, per-layer info)."""
    import jax

    from nexvitad_jax.inference import sweep_k

    prototypes, layers = {k: [] for k in ks}, []
    for layer, features in enumerate(bank):
        patches = features.reshape(-1, features.shape[-1])
        effective = capped_ks(ks, patches.shape[0])
        distinct = sorted(set(effective))
        sweep = sweep_k(patches, distinct, rng=jax.random.fold_in(rng, layer), **kmeans_options)
        by_k = dict(zip(distinct, sweep.prototypes))
        converged = dict(zip(distinct, np.asarray(sweep.result.converged).tolist()))
        objective = dict(zip(distinct, np.asarray(sweep.objective).tolist()))
        for k, e in zip(ks, effective):
            prototypes[k].append(by_k[e])
        layers.append({"patches": int(patches.shape[0]), "effective_k": effective,
                       "converged": [bool(converged[k]) for k in effective],
                       "objective": [float(objective[k]) for k in effective]})
    return prototypes, layers


def cap_lines(ks: Sequence[int], layers: Sequence[dict]) -> list[str]:
    """'K=20: layer 3 (16 patches) -> 16' for every K capped on a layer."""
    return [f"K={k}: layer {layer} ({info['patches']} patches) -> {effective}"
            for layer, info in enumerate(layers) for k, effective in zip(ks, info["effective_k"]) if effective < k]


def sweep_class(extractor, config, dataset, category: str, seed: int, ks: Sequence[int]) -> dict[str, Any]:
    """Metrics of one target class for every K."""
    import jax

    from nexvitad_jax.data import few_shot_indices
    from nexvitad_jax.inference import AnomalyDetector
    from nexvitad_jax.pipeline import evaluate_maps

    batch_size = int(config.get("eval_batch_size", 8))
    extract = AnomalyDetector(extractor, batch_size=batch_size).extract
    train = dataset.load(category, "train")
    normal = train.images[few_shot_indices(train.paths, int(config.few_shot), seed)]
    prototypes, layers = fit_prototypes(extract(normal.astype(np.float32) / 255.0), ks, rng=jax.random.key(seed),
                                        kmeans_options=dict(config.get("kmeans", {})))
    test = dataset.load(category, "test")
    test_features = extract(test.images.astype(np.float32) / 255.0)
    per_k = {}
    for k in ks:
        maps, scores = score_batches(test_features, prototypes[k], tuple(test.images.shape[1:3]),
                                     float(config.get("sigma", 2.0)), batch_size)
        per_k[str(k)] = evaluate_maps(maps, test.masks, scores, test.labels)
    return {"per_k": per_k, "layers": layers}


def execute(workdir: Path, progress: bool, *, config, data: str, split: str, seed: int,
            ks: Sequence[int]) -> dict[str, Any]:
    from nexvitad_jax.data import open_dataset
    from nexvitad_jax.pipeline import (EncoderFeatureExtractor, atomic_write, mean_metrics, resolve_classes,
                                       resolve_split)
    from nexvitad_jax.train.loop import train

    dataset = open_dataset(data, image_size=int(config.image_size))
    source, target = resolve_split(resolve_classes(dataset), split, None, seed)
    trained = train(config, dataset, source, target, workdir / "train", progress=progress)
    extractor = EncoderFeatureExtractor(trained.model, kind=str(config.get("bank_features", "interleaved")),
                                        layers=tuple(config.get("bank_layers", (0, 1, 2, 3))))
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
    groups = summary["groups"]
    panels = []
    for metric, title in protocol.PLOT_METRICS:
        series = {}
        for split in dict.fromkeys(group["split"] for group in groups):
            mine = [g for g in groups if g["split"] == split and g["metrics"][metric]["mean"] is not None]
            series[split] = ([g["k"] for g in mine], [100 * g["metrics"][metric]["mean"] for g in mine],
                             [100 * (g["metrics"][metric]["std"] or 0.0) for g in mine])
        panels.append((title, f"{title} (%)", series))
    return [protocol.line_panels(panels, out / "cluster_sweep.png", "number of clusters K",
                                 "Fig. 8: memory-bank metrics vs K (mean ± std over seeds)")]


def build(args: argparse.Namespace) -> Sweep:
    ks = protocol.positive_integers(args.ks, "--ks")
    return Sweep("cluster_sweep", "NexViTAD ablation: number of clusters K (memory bank)",
                 protocol.protocol_runs(args, {"": {}}, execute, ks=ks), aggregate, plot)


def arguments(parser: argparse.ArgumentParser) -> None:
    protocol.protocol_arguments(parser)
    parser.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)),
                        help=f"cluster counts (default {','.join(map(str, DEFAULT_KS))})")


if __name__ == "__main__":
    sys.exit(main(build, sys.argv[1:], __doc__, arguments))
