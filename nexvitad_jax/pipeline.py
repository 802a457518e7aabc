"""The main job, `nexvitad run`: train on the source classes, adapt to the target classes, build the
memory banks, score the target test sets and evaluate them (the paper's whole protocol).

    nexvitad run                                   # synthetic set, tiny random backbones, 11/1
    nexvitad run --data PATH/TO/mvtec --split 10/2 --seed 1
    nexvitad run --config experiments/configs/paper.py --data PATH/TO/mvtec --workdir runs/paper

Outputs in the workdir: `metrics.json` (config, split, per-class and mean metrics of each inference
path, timings), `results.md` (a Table 1 row and the per-class table), `heatmaps/CLASS.png`
(original | ground truth | heatmaps, the paper's Fig. 4) and `maps/CLASS.METHOD.npz` (the anomaly
maps, for `nexvitad evaluate`). Every stage is resumable: training from its checkpoints, inference per
target class from the files it already wrote.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nexvitad_jax.errors import UserInputError

DEFAULT_CONFIG = "experiments.configs.demo"
METHODS = ("memory_bank", "decoder")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pro_iou", "aupro", "pixel_f1max")
IMAGE_METRICS = ("image_auroc",)
RESULT_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- configs


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()):
    """`get_config()` of a config file (default: experiments/configs/demo.py), then `key=value` overrides
    (values are Python literals: `epochs=4`, `decoder_channels=(32,16,8)`, `hiera_checkpoint="dir"`)."""
    if path is None:
        module = importlib.import_module(DEFAULT_CONFIG)
    else:
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"config {str(path)!r}: no such file; expected a Python file with get_config() "
                                 "(see experiments/configs/)")
        spec = importlib.util.spec_from_file_location(f"_nexvitad_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise UserInputError(f"config {path}: could not be executed ({type(error).__name__}: {error})") from error
        if not hasattr(module, "get_config"):
            raise UserInputError(f"config {path}: defines no get_config()")
    config = module.get_config()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"--set {item!r}: expected KEY=VALUE, e.g. epochs=4")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word is a string
        *parents, last = key.split(".")
        target = config
        for part in parents:
            if part not in target:
                raise UserInputError(f"--set {item!r}: the config has no field {part!r}")
            target = target[part]
        if last not in target:
            raise UserInputError(f"--set {item!r}: the config has no field {last!r}; fields: {sorted(target.keys())}")
        try:
            target[last] = value
        except TypeError as error:  # ConfigDict keeps each field's type
            raise UserInputError(f"--set {item!r}: {error}") from None
    return config


def config_dict(config) -> dict[str, Any]:
    """The config as JSON-able data (tuples become lists)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(data, default=str))


def uses_random_backbones(config) -> bool:
    return not (config.get("hiera_checkpoint") and config.get("dinov2_checkpoint"))


RANDOM_BACKBONE_NOTICE = (
    "nexvitad run: the backbones are RANDOMLY INITIALIZED tiny Hiera and DINOv2 (no pretrained weights "
    "here), so the figures show that the pipeline works, not the paper's accuracy. For the paper's "
    "setting convert real weights (python -m converters hiera --source facebook/hiera-huge-224-hf --out "
    "checkpoints/hiera-huge; python -m converters dinov2 --source facebook/dinov2-small --out "
    "checkpoints/dinov2-small) and run with --config experiments/configs/paper.py.")


# ----------------------------------------------------------------------------- data and split


def resolve_classes(dataset) -> list[str]:
    """The paper's 12 classes when the dataset holds them all (full MVTec AD), else what it holds."""
    from nexvitad_jax.data import PAPER_CLASSES

    held = sorted(dataset.classes)
    return list(PAPER_CLASSES) if set(PAPER_CLASSES) <= set(held) else held


def resolve_split(classes: Sequence[str], split: str | None, target: str | Sequence[str] | None,
                  seed: int) -> tuple[list[str], list[str]]:
    """(source, target) classes: `target` fixes the targets, else the split draws them by seed.

    A split using fewer classes than available (e.g. 1/1 on a larger set) first draws its classes.
    """
    from nexvitad_jax.data import fixed_split, make_split, parse_split

    if target:
        names = [t.strip() for t in target.split(",")] if isinstance(target, str) else list(target)
        source, chosen = fixed_split(classes, [n for n in names if n])
        if split is not None:
            n_source, n_target = parse_split(split)
            if n_target != len(chosen) or n_source > len(source):
                raise UserInputError(f"--split {split} does not fit --target {','.join(chosen)} with "
                                     f"{len(source)} other classes available")
            source = sorted(np.random.default_rng(seed).permutation(source)[:n_source].tolist())
        return source, chosen
    n_source, n_target = parse_split(split) if split is not None else (len(classes) - 1, 1)
    if n_source + n_target > len(classes):
        raise UserInputError(f"split {n_source}/{n_target} needs {n_source + n_target} classes; the dataset "
                             f"holds {len(classes)}: {list(classes)}")
    pool = sorted(classes)
    if n_source + n_target < len(pool):
        pool = sorted(np.random.default_rng([seed, 1]).permutation(pool)[:n_source + n_target].tolist())
    return make_split(pool, n_target, seed)


# ----------------------------------------------------------------------------- inference paths


class EncoderFeatureExtractor:
    """The trained NexViTAD encoder as an `AnomalyDetector` feature extractor: F_1..F_4 (eq. 3)."""

    def __init__(self, model, *, kind: str = "interleaved", layers: Sequence[int] = (0, 1, 2, 3),
                 identity: dict | None = None):
        from nexvitad_jax.inference.detector import weights_fingerprint

        num_layers = len(model.encoder.stage_dims)
        self.layers = tuple(int(layer) for layer in layers)
        if not self.layers or any(not 0 <= layer < num_layers for layer in self.layers):
            raise UserInputError(f"bank_layers = {list(layers)}: expected layer indices in 0..{num_layers - 1}")
        self.kind = kind
        # Weights enter the compiled function as arguments, not as baked-in constants.
        self._graph, self._state = nnx.split(model.encoder)
        self._identity = {"kind": "nexvitad-encoder", "features": kind, "layers": list(self.layers),
                          "weights": weights_fingerprint(self._state), **(identity or {})}
        self._pipeline = jax.jit(self._features)

    def _features(self, state, images):
        from nexvitad_jax.models.nexvitad import normalize

        features = nnx.merge(self._graph, state)(normalize(images), kind=self.kind)
        return [features[layer].astype(jnp.float32) for layer in self.layers]

    def __call__(self, images: jax.Array) -> list[jax.Array]:
        return self._pipeline(self._state, jnp.asarray(images))

    def describe(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._identity))


class DecoderSegmenter:
    """The paper's "original decoder" inference: target class c's segmentation head on its test
    images, anomaly probability per pixel (BatchNorm in eval), image score = max of the map."""

    def __init__(self, model):
        self._graph, self._state = nnx.split(model)
        self._pipeline = jax.jit(self._maps, static_argnames="head")

    def _maps(self, state, images, head: int):
        model = nnx.merge(self._graph, state)
        features = model.encode(images)
        # Every target head sees the same images; keep the class's own (heads run stacked).
        stacked = tuple(jnp.broadcast_to(f[None], (model.num_target, *f.shape)) for f in features)
        logits = model.target_logits(stacked, images.shape[1:3], train=False)[head]
        maps = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]
        return maps, jnp.max(maps, axis=(1, 2))

    def __call__(self, images: np.ndarray, head: int, batch_size: int, progress=None) -> tuple[np.ndarray, np.ndarray]:
        from nexvitad_jax.inference.detector import padded_batches

        maps, scores = [], []
        for count, padded in padded_batches(images, batch_size):
            batch_maps, batch_scores = self._pipeline(self._state, jnp.asarray(padded), head=int(head))
            maps.append(np.asarray(batch_maps[:count]))
            scores.append(np.asarray(batch_scores[:count]))
            if progress is not None:
                progress.update(count)
        return np.concatenate(maps), np.concatenate(scores)


def evaluate_maps(maps: np.ndarray, masks: np.ndarray, image_scores: np.ndarray, labels: np.ndarray) -> dict:
    """Pixel and image metrics of one class; a metric that is undefined there (e.g. a test set with
    no normal image has no image AUROC) is recorded as null with the reason."""
    from nexvitad_jax.metrics import evaluate

    results: dict[str, Any] = {}
    for names, kwargs in ((PIXEL_METRICS, {}), (IMAGE_METRICS, dict(image_scores=image_scores, image_labels=labels))):
        try:
            results.update(evaluate(maps, masks, list(names), **kwargs))
        except UserInputError as error:
            results.update({name: None for name in names})
            results.setdefault("undefined", {}).update({name: str(error) for name in names})
    return results


# ----------------------------------------------------------------------------- run


@dataclasses.dataclass
class RunSpec:
    """What one run is: everything that changes its results (its key) and where it writes."""

    config: Any
    data: str = "synthetic"
    split: str | None = None
    target: str | Sequence[str] | None = None
    seed: int | None = None
    methods: tuple[str, ...] = METHODS

    def resolved_seed(self) -> int:
        return int(self.config.seed if self.seed is None else self.seed)


def _writes_outputs() -> bool:
    """On several hosts every process computes the same results; process 0 writes them."""
    return jax.process_index() == 0


def atomic_write(path: Path, text: str) -> None:
    """Write a text file so a reader (or a resumed run) never sees it half-written."""
    if not _writes_outputs():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_savez(path: Path, **arrays) -> None:
    if not _writes_outputs():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _run_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _check_workdir(workdir: Path, identity: dict) -> None:
    """A workdir holds one run: resuming into it with another config or split is refused."""
    path = workdir / "run.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") != _run_key(identity):
            from nexvitad_jax.inference.detector import describe_differences

            differences = describe_differences(saved.get("identity", {}), identity)
            raise UserInputError(f"{workdir} holds another run (differences: {'; '.join(differences) or 'format'}); "
                                 "use a new --workdir, or delete that one to start over")
    else:
        atomic_write(path, json.dumps({"key": _run_key(identity), "identity": identity}, indent=1) + "\n")


def run(spec: RunSpec, workdir: str | Path, *, progress: bool = True, log=print) -> dict[str, Any]:
    """The whole protocol for one (config, data, split, seed); returns what metrics.json holds."""
    from tqdm.auto import tqdm

    from nexvitad_jax.data import few_shot_indices, open_dataset
    from nexvitad_jax.inference.detector import AnomalyDetector
    from nexvitad_jax.train.loop import train

    for method in spec.methods:
        if method not in METHODS:
            raise UserInputError(f"inference method {method!r}; expected some of {METHODS}")
    config, seed, workdir = spec.config, spec.resolved_seed(), Path(workdir)
    if spec.seed is not None and int(config.seed) != seed:
        config = load_config_copy(config, seed=seed)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    dataset = open_dataset(spec.data, image_size=int(config.image_size))
    source, target = resolve_split(resolve_classes(dataset), spec.split, spec.target, seed)
    identity = {"format": RESULT_FORMAT_VERSION, "config": config_dict(config), "data": str(spec.data),
                "source": source, "target": target, "seed": seed}
    workdir.mkdir(parents=True, exist_ok=True)
    _check_workdir(workdir, identity)
    log(f"nexvitad run: {len(source)} source classes {source} -> target {target} (seed {seed}); workdir {workdir}")
    if uses_random_backbones(config):
        log(RANDOM_BACKBONE_NOTICE)

    start = time.perf_counter()
    trained = train(config, dataset, source, target, workdir / "train", progress=progress)
    timings["train_s"] = time.perf_counter() - start
    model = trained.model

    k, sigma = int(config.get("k", 30)), float(config.get("sigma", 2.0))
    batch_size = int(config.get("eval_batch_size", 8))
    extractor = EncoderFeatureExtractor(model, kind=str(config.get("bank_features", "interleaved")),
                                        layers=tuple(config.get("bank_layers", (0, 1, 2, 3))),
                                        identity={"run": _run_key(identity)})
    segmenter = DecoderSegmenter(model) if "decoder" in spec.methods else None
    per_class: dict[str, dict] = {}
    start = time.perf_counter()
    for head, category in enumerate(target):
        result_path = workdir / "classes" / f"{category}.json"
        if result_path.is_file():
            per_class[category] = json.loads(result_path.read_text())["metrics"]
            log(f"nexvitad run: {category}: already scored (resumed)")
            continue
        test = dataset.load(category, "test")
        train_split = dataset.load(category, "train")
        normal = train_split.images[few_shot_indices(train_split.paths, int(config.few_shot), seed)]
        images = test.images.astype(np.float32) / 255.0
        maps: dict[str, np.ndarray] = {}
        class_metrics: dict[str, dict] = {}
        class_timings: dict[str, float] = {}
        bar = tqdm(total=len(normal) * ("memory_bank" in spec.methods) + len(images) * len(spec.methods),
                   desc=f"score {category}", unit="img", disable=not progress)
        with bar:
            if "memory_bank" in spec.methods:
                tick = time.perf_counter()
                detector = AnomalyDetector(extractor, k=k, sigma=sigma, seed=seed, batch_size=batch_size,
                                           kmeans_options=dict(config.get("kmeans", {})))
                detector.fit(normal.astype(np.float32) / 255.0, bar)
                maps["memory_bank"], scores = detector.predict(images, bar)
                maps["memory_bank_image_scores"] = scores
                class_timings["memory_bank_s"] = time.perf_counter() - tick
                unconverged = [layer for layer, r in enumerate(detector.memory_bank.results) if not bool(r.converged)]
                if unconverged:
                    log(f"nexvitad run: {category}: K-means did not converge on layers {unconverged} "
                        f"(max iterations reached)")
            if segmenter is not None:
                tick = time.perf_counter()
                maps["decoder"], maps["decoder_image_scores"] = segmenter(images, head, batch_size, bar)
                class_timings["decoder_s"] = time.perf_counter() - tick
        for method in spec.methods:
            class_metrics[method] = evaluate_maps(maps[method], test.masks, maps[f"{method}_image_scores"],
                                                  test.labels)
        for method in spec.methods:  # `nexvitad evaluate maps/CLASS.METHOD.npz` reads these
            atomic_savez(workdir / "maps" / f"{category}.{method}.npz", scores=maps[method], masks=test.masks,
                          image_scores=maps[f"{method}_image_scores"], labels=test.labels)
        from nexvitad_jax.report import heatmap_grid

        if _writes_outputs():
            heatmap_grid(workdir / "heatmaps" / f"{category}.png", category, test,
                         {method: maps[method] for method in spec.methods})
        per_class[category] = class_metrics
        atomic_write(result_path, json.dumps({"metrics": class_metrics, "timings": class_timings,
                                               "n_test": len(test), "n_anomalous": int(test.labels.sum())},
                                              indent=1) + "\n")
        summary = ", ".join(f"{m} pixel AUROC {_fmt(class_metrics[m]['pixel_auroc'])}" for m in spec.methods)
        log(f"nexvitad run: {category}: {summary}")
    timings["inference_s"] = time.perf_counter() - start
    timings["total_s"] = time.perf_counter() - began

    results = {"format": RESULT_FORMAT_VERSION, "data": str(spec.data), "seed": seed, "source": source,
               "target": target, "split": f"{len(source)}/{len(target)}", "methods": list(spec.methods),
               "random_backbones": uses_random_backbones(config), "train_steps": trained.steps,
               "train_last_metrics": trained.last_metrics, "per_class": per_class,
               "mean": {m: mean_metrics([per_class[c][m] for c in target]) for m in spec.methods},
               "timings": timings, "config": config_dict(config)}
    from nexvitad_jax.report import results_markdown

    atomic_write(workdir / "metrics.json", json.dumps(results, indent=1) + "\n")
    atomic_write(workdir / "results.md", results_markdown(results))
    return results


def load_config_copy(config, **changes):
    """A copy of `config` with some fields changed (the original is left alone)."""
    copy = config.copy_and_resolve_references()
    for key, value in changes.items():
        copy[key] = value
    return copy


def mean_metrics(rows: Sequence[dict]) -> dict[str, float | None]:
    """Mean of each metric over classes (None where any class has it undefined)."""
    names = [name for name in rows[0] if name != "undefined"]
    return {name: (None if any(r.get(name) is None for r in rows) else float(np.mean([r[name] for r in rows])))
            for name in names}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ----------------------------------------------------------------------------- command line


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every protocol script shares (`nexvitad run` and experiments/)."""
    parser.add_argument("--config", default=None,
                        help="config file with get_config() (default: experiments/configs/demo.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable), e.g. --set epochs=4")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (default), an MVTec AD folder or the official .tar.xz archive")


def initialize_distributed() -> None:
    """Multi-host runs: every host starts the same command with JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or under SLURM, which jax detects itself); each process
    then feeds its shard of the training batch. A single host needs nothing."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        try:
            count, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError) as error:
            raise UserInputError(f"JAX_COORDINATOR_ADDRESS={address} is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                                 f"must be integers too ({error})") from None
        jax.distributed.initialize(address, num_processes=count, process_id=index)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nexvitad run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    add_run_arguments(parser)
    parser.add_argument("--split", default=None,
                        help="SOURCE/TARGET class counts, e.g. 11/1 (default: all classes but one as source)")
    parser.add_argument("--target", default=None, help="fix the target classes, e.g. hazelnut or bottle,cable")
    parser.add_argument("--seed", type=int, default=None, help="split, few-shot images and init (default: config)")
    parser.add_argument("--workdir", default="runs/default", help="outputs and checkpoints (default runs/default)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"inference paths, comma-separated (default {','.join(METHODS)})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    initialize_distributed()
    spec = RunSpec(config, data=args.data, split=args.split, target=args.target, seed=args.seed,
                   methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    results = run(spec, args.workdir, progress=not args.no_progress,
                  log=lambda message: print(message, file=sys.stderr))
    from nexvitad_jax.report import results_markdown

    print(results_markdown(results))
    print(f"nexvitad run: done in {results['timings']['total_s']:.0f} s; metrics.json, results.md and "
          f"heatmaps/ in {args.workdir}", file=sys.stderr)
    return 0
