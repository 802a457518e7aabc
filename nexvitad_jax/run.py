"""The main job, `nexvitad run`: train on the source classes, adapt to the target classes, build the
memory banks, score the target test sets and evaluate them (the paper's whole protocol).

    nexvitad run                                   # synthetic set, tiny random backbones, 11/1
    nexvitad run --data PATH/TO/mvtec --split 10/2 --seed 1
    nexvitad run --config paper --data PATH/TO/mvtec --workdir runs/paper
    nexvitad run --workdir runs/paper --config paper --data PATH/TO/mvtec --rescore   # inference again

Outputs in the workdir: `metrics.json` (config, split, per-class and mean metrics of each inference
path, timings), `results.md` (a Table 1 row and the per-class table), `heatmaps/CLASS.png`
(every defect type: image | ground truth | map and overlay per method, colour bars, image scores and
decisions; the paper's Fig. 4), `maps/CLASS.METHOD.npz` (the anomaly maps, for `nexvitad evaluate`),
`report.html` (all of it in one self-contained page, with the training curves; `nexvitad report`
rebuilds it) and, with the `tensorboard` extra, `train/tensorboard/` event files. Every stage is resumable: training from its checkpoints, inference per
target class from the files it already wrote. Before anything is written the config is checked whole
(`nexvitad_jax.config.check_config`) and so is the data the run reads (every image and mask:
`check_data`), each listing all the problems it finds. A run that finished earlier is reported and
left as it is; `--rescore` redoes its inference from the trained checkpoints.

Every stage uses every device of every host (one mesh, `nexvitad_jax.sharding`): training shards its
batches, the memory bank is extracted from the normal images spread over the devices, and the test
images are scored spread over them too; the maps are gathered once per class for the metrics, and
process 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from nexvitad_jax.argparsing import command_parser
from nexvitad_jax.config import (check_config, config_dict, load_config, problems_error, uses_random_backbones,
                                 with_changes)
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.identity import describe_differences, identity_key
from nexvitad_jax.io import atomic_savez, atomic_write, writes_outputs

METHODS = ("memory_bank", "decoder")
RESULT_FORMAT_VERSION = 2  # 2: the nested config

RANDOM_BACKBONE_NOTICE = (
    "nexvitad run: the backbones are RANDOMLY INITIALIZED tiny Hiera and DINOv2 (no pretrained weights "
    "here), so the figures show that the pipeline works, not the paper's accuracy. For the paper's "
    "setting convert real weights (python -m converters hiera --source facebook/hiera-huge-224-hf --out "
    "checkpoints/hiera-huge; python -m converters dinov2 --source facebook/dinov2-small --out "
    "checkpoints/dinov2-small) and run with --config paper.")


@dataclasses.dataclass
class RunSpec:
    """What one run is: everything that changes its results (its key) and where it writes."""

    config: Any
    data: str = "synthetic"
    split: str | None = None
    target: str | Sequence[str] | None = None
    seed: int | None = None  # None: the config's
    methods: tuple[str, ...] = METHODS
    target_data: str | None = None  # the target classes' dataset, when it is not `data` (cross-dataset)

    def resolved(self):
        """(the config with the run's seed, the seed); unknown methods are refused."""
        for method in self.methods:
            if method not in METHODS:
                raise UserInputError(f"inference method {method!r}; expected some of {METHODS}")
        seed = int(self.config.seed if self.seed is None else self.seed)
        config = self.config if int(self.config.seed) == seed else with_changes(self.config, {"seed": seed})
        return config, seed


@dataclasses.dataclass
class TargetContext:
    """What scoring a target class needs: the trained model's inference paths and the run's setting."""

    config: Any
    dataset: Any
    seed: int
    methods: tuple[str, ...]
    extractor: Any  # EncoderFeatureExtractor of the trained encoder
    decoder: Any  # DecoderBaseline, or None when the decoder path is not asked for
    progress: bool
    log: Callable[[str], None]
    mesh: Any  # the devices scoring spreads its images over (the extractor's and decoder's)


# ----------------------------------------------------------------------------- the workdir


def claim_workdir(workdir: Path, identity: dict) -> str:
    """A workdir holds one run: its run.json names it; resuming with another identity is refused.
    First this process takes the workdir's lock (`nexvitad_jax.lock`; process 0 only): another live
    process there is refused (WorkdirBusy, exit status 2), one that died is taken over with a
    notice. The lock is held until `release_workdir(workdir)` or this process's end. Returns the
    run's key."""
    from nexvitad_jax.lock import hold_workdir, release_workdir

    if writes_outputs():
        hold_workdir(workdir, notice=lambda message: print(f"nexvitad run: {message}", file=sys.stderr))
    key = identity_key(identity)
    path = workdir / "run.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") != key:
            release_workdir(workdir)
            differences = describe_differences(saved.get("identity", {}), identity, what="saved run")
            raise UserInputError(f"{workdir} holds another run (differences: {'; '.join(differences) or 'format'}); "
                                 "use a new --workdir, or delete that one to start over")
    else:
        atomic_write(path, json.dumps({"key": key, "identity": identity}, indent=1) + "\n")
    return key


# ----------------------------------------------------------------------------- per target class


def memory_bank_maps(context: TargetContext, category: str, images: np.ndarray, bar):
    """The memory bank of the class's few-shot normal images, then its maps of the test images."""
    from nexvitad_jax.data import few_shot_images
    from nexvitad_jax.inference.detector import AnomalyDetector

    config = context.config
    normal = few_shot_images(context.dataset, category, int(config.data.few_shot), context.seed)
    detector = AnomalyDetector(context.extractor, k=int(config.bank.k), sigma=float(config.bank.sigma),
                               seed=context.seed, batch_size=int(config.eval.batch_size),
                               kmeans_options=config.bank.kmeans.to_dict(), mesh=context.mesh)
    detector.fit(normal.astype(np.float32) / 255.0, bar)
    unconverged = detector.memory_bank.unconverged_layers()
    if unconverged:
        context.log(f"nexvitad run: {category}: K-means did not converge on layers {unconverged} "
                    "(max iterations reached)")
    return detector.predict(images, bar)


def score_class(context: TargetContext, category: str, head: int) -> tuple[dict, dict, Any]:
    """Maps and image scores of every inference path on the class's test set, their metrics and
    timings; returns (record, maps, test set)."""
    from tqdm.auto import tqdm

    from nexvitad_jax.metrics import evaluate_maps

    test = context.dataset.load(category, "test")
    images = test.images.astype(np.float32) / 255.0
    maps, timings = {}, {}
    total = int(context.config.data.few_shot) * ("memory_bank" in context.methods) + len(images) * len(context.methods)
    with tqdm(total=total, desc=f"score {category}", unit="img", disable=not context.progress) as bar:
        for method in context.methods:
            tick = time.perf_counter()
            if method == "memory_bank":
                maps[method], maps[f"{method}_image_scores"] = memory_bank_maps(context, category, images, bar)
            else:
                maps[method], maps[f"{method}_image_scores"] = context.decoder.predict(images, head, bar)
            timings[f"{method}_s"] = time.perf_counter() - tick
    reason = test.unmasked_reason()
    metrics = {method: evaluate_maps(maps[method], test.masks, maps[f"{method}_image_scores"], test.labels,
                                     mask_known=test.mask_known, reason=reason)
               for method in context.methods}
    record = {"metrics": metrics, "timings": timings, "n_test": len(test), "n_anomalous": int(test.labels.sum())}
    return record, maps, test


def write_class_outputs(workdir: Path, category: str, record: dict, maps: dict, test, methods) -> None:
    """maps/CLASS.METHOD.npz (read by `nexvitad evaluate`), heatmaps/CLASS.png (every defect type,
    maps and overlays, image scores and oracle decisions), classes/CLASS.json (written last: it marks
    the class done for a resumed run)."""
    from nexvitad_jax.report import heatmap_grid

    for method in methods:
        atomic_savez(workdir / "maps" / f"{category}.{method}.npz", scores=maps[method], masks=test.masks,
                     image_scores=maps[f"{method}_image_scores"], labels=test.labels,
                     mask_known=test.mask_known)
    if writes_outputs():
        heatmap_grid(workdir / "heatmaps" / f"{category}.png", category, test, {m: maps[m] for m in methods},
                     {m: maps[f"{m}_image_scores"] for m in methods})
    atomic_write(workdir / "classes" / f"{category}.json", json.dumps(record, indent=1) + "\n")


def score_target_classes(context: TargetContext, target: Sequence[str], workdir: Path) -> dict[str, dict]:
    """Every target class's metrics; classes scored by an earlier run of this workdir are read back."""
    per_class = {}
    for head, category in enumerate(target):
        path = workdir / "classes" / f"{category}.json"
        if path.is_file():
            per_class[category] = json.loads(path.read_text())["metrics"]
            context.log(f"nexvitad run: {category}: already scored (resumed)")
            continue
        record, maps, test = score_class(context, category, head)
        write_class_outputs(workdir, category, record, maps, test, context.methods)
        per_class[category] = record["metrics"]
        summary = ", ".join(f"{m} pixel AUROC {_format(record['metrics'][m]['pixel_auroc'])}" for m in context.methods)
        context.log(f"nexvitad run: {category}: {summary}")
    return per_class


def _format(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ----------------------------------------------------------------------------- the run


class EarlierResults(dict):
    """metrics.json of a run that had finished in its workdir, returned as it was read: nothing
    was computed or rewritten."""


def finished_results(workdir: Path, key: str) -> EarlierResults | None:
    """The workdir's metrics.json when the run of `key` finished there (run.json names it, and
    metrics.json, written last, exists), else None."""
    try:
        if json.loads((workdir / "run.json").read_text()).get("key") != key:
            return None
        return EarlierResults(json.loads((workdir / "metrics.json").read_text()))
    except (OSError, ValueError):  # missing or half-written: not finished
        return None


def describe_finished(workdir: Path, results: dict) -> str:
    """"2026-11-30 20:41, train 7 s, inference 3 s": when and how long, as metrics.json says."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime((workdir / "metrics.json").stat().st_mtime))
    timings = results.get("timings", {})
    spent = [f"{name[:-2]} {timings[name]:.0f} s" for name in ("train_s", "inference_s") if name in timings]
    return ", ".join([when, *spent])


def clear_inference(workdir: Path, target: Sequence[str], log) -> None:
    """`--rescore`: the inference outputs go (the classes' records, maps, heatmaps, results); the
    trained checkpoints stay, so the run re-scores without training again."""
    outputs = [workdir / name for name in ("metrics.json", "results.md", "report.html")]
    for category in target:
        outputs += [workdir / "classes" / f"{category}.json", workdir / "heatmaps" / f"{category}.png",
                    *(workdir / "maps").glob(f"{category}.*.npz")]
    removed = [path for path in outputs if path.is_file()]
    for path in removed:
        path.unlink()
    log(f"nexvitad run: --rescore: {len(removed)} inference outputs removed; the trained checkpoints are kept")


def check_data(dataset, source: Sequence[str], target: Sequence[str], what: str = "data") -> None:
    """UserInputError listing every problem of the data the run reads (`run_data_problems`)."""
    from nexvitad_jax.data import run_data_problems

    problems = run_data_problems(dataset, source, target)
    if problems:
        raise problems_error(problems, what)


@dataclasses.dataclass
class RunPlan:
    """What a spec runs, before any data is read: its checked config and seed, the dataset (indexed),
    the split and the identity (run.json; its key names the run)."""

    config: Any
    seed: int
    dataset: Any
    source: list[str]
    target: list[str]
    identity: dict[str, Any]

    @property
    def key(self) -> str:
        return identity_key(self.identity)


def plan_run(spec: RunSpec) -> RunPlan:
    """The spec's plan; the config is checked whole first (`check_config`)."""
    from nexvitad_jax.data import open_dataset, split_classes

    config, seed = spec.resolved()
    check_config(config)
    dataset = open_dataset(spec.data, image_size=int(config.data.image_size), target_spec=spec.target_data)
    source, target = split_classes(dataset, spec.split, spec.target, seed)
    identity = {"format": RESULT_FORMAT_VERSION, "config": config_dict(config), "data": str(spec.data),
                "source": source, "target": target, "seed": seed}
    if spec.target_data is not None:
        identity["target_data"] = str(spec.target_data)
    return RunPlan(config, seed, dataset, source, target, identity)


def run(spec: RunSpec, workdir: str | Path, *, progress: bool = True, log=print,
        rescore: bool = False) -> dict[str, Any]:
    """The whole protocol for one (config, data, split, seed); returns what metrics.json holds.
    The config and the data are checked first, before anything is written. A run that finished
    earlier in `workdir` is left as it is (its metrics.json is returned, as `EarlierResults`);
    `rescore`: its inference is done again from the trained checkpoints."""
    from nexvitad_jax.lock import workdir_lock

    workdir, began = Path(workdir), time.perf_counter()
    plan = plan_run(spec)
    # The workdir's lock before its run.json is read: one run at a time, a dead holder's lock taken over.
    with workdir_lock(workdir, notice=lambda message: log(f"nexvitad run: {message}")):
        return _run_locked(spec, plan, workdir, began, progress=progress, log=log, rescore=rescore)


def _run_locked(spec: RunSpec, plan, workdir: Path, began: float, *, progress: bool, log,
                rescore: bool) -> dict[str, Any]:
    """`run` with the workdir's lock held."""
    from nexvitad_jax.sharding import make_mesh
    from nexvitad_jax.train import train

    timings = {}
    config, seed, dataset, source, target = plan.config, plan.seed, plan.dataset, plan.source, plan.target
    earlier = finished_results(workdir, plan.key)
    if earlier is not None and not rescore:
        log(f"nexvitad run: finished earlier ({describe_finished(workdir, earlier)}); results in {workdir}")
        return earlier
    check_data(dataset, source, target, f"--data {spec.data}" + (f" / --target-data {spec.target_data}"
                                                                   if spec.target_data is not None else ""))
    workdir.mkdir(parents=True, exist_ok=True)
    key = claim_workdir(workdir, plan.identity)
    log(f"nexvitad run: {len(source)} source classes {source} -> target {target} (seed {seed}); workdir {workdir}")
    if uses_random_backbones(config):
        log(RANDOM_BACKBONE_NOTICE)
    if rescore:
        clear_inference(workdir, target, log)

    tick = time.perf_counter()
    trained = train(config, dataset, source, target, workdir / "train", progress=progress)
    trained_at = time.perf_counter()
    timings["train_s"] = trained_at - tick
    if earlier is not None:  # rescored: the training's own time, not this run's restore
        timings["train_s"] = float(earlier.get("timings", {}).get("train_s", timings["train_s"]))
    context = target_context(config, dataset, seed, spec.methods, trained.model, key, progress, log, make_mesh())
    per_class = score_target_classes(context, target, workdir)
    timings["inference_s"] = time.perf_counter() - trained_at
    timings["total_s"] = (time.perf_counter() - began if earlier is None
                          else timings["train_s"] + timings["inference_s"])
    results = run_results(spec, config, seed, source, target, trained, per_class, timings)
    write_results(workdir, results)
    return results


def target_context(config, dataset, seed: int, methods, model, key: str, progress: bool, log, mesh) -> TargetContext:
    """The inference paths of the trained `model` on `mesh`, for scoring the target classes."""
    from nexvitad_jax.inference import DecoderBaseline, EncoderFeatureExtractor

    extractor = EncoderFeatureExtractor.from_config(model, config.bank, identity={"run": key}, mesh=mesh)
    decoder = (DecoderBaseline(model, batch_size=int(config.eval.batch_size), mesh=mesh)
               if "decoder" in methods else None)
    return TargetContext(config, dataset, seed, tuple(methods), extractor, decoder, progress, log, mesh)


def run_results(spec: RunSpec, config, seed: int, source, target, trained, per_class, timings) -> dict[str, Any]:
    """What metrics.json holds."""
    from nexvitad_jax.metrics import mean_metrics

    return {"format": RESULT_FORMAT_VERSION, "data": str(spec.data), "target_data": spec.target_data,
            "seed": seed, "source": source,
            "target": target, "split": f"{len(source)}/{len(target)}", "methods": list(spec.methods),
            "random_backbones": uses_random_backbones(config), "train_steps": trained.steps,
            "train_last_metrics": trained.last_metrics, "per_class": per_class,
            "mean": {m: mean_metrics([per_class[c][m] for c in target]) for m in spec.methods},
            "timings": timings, "config": config_dict(config)}


def write_results(workdir: Path, results: dict[str, Any]) -> None:
    """metrics.json, results.md, the training curves as TensorBoard events when tensorboardX is
    installed (train/tensorboard), and report.html (all of it: `nexvitad report WORKDIR`)."""
    from nexvitad_jax.report import results_markdown, tensorboard_available, write_tensorboard
    from nexvitad_jax.report_html import write_report

    atomic_write(workdir / "metrics.json", json.dumps(results, indent=1) + "\n")
    atomic_write(workdir / "results.md", results_markdown(results))
    if writes_outputs():
        if tensorboard_available() and (workdir / "train" / "metrics.jsonl").is_file():
            write_tensorboard(workdir / "train" / "metrics.jsonl")
        write_report(workdir)


# ----------------------------------------------------------------------------- command line


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every protocol script shares (`nexvitad run` and experiments/)."""
    parser.add_argument("--config", default=None,
                        help="a packaged config (paper, tiny, demo) or a Python file with get_config() "
                             "(default: demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable), e.g. --set train.epochs=4")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (default), a dataset folder (MVTec AD, MPDD, MVTec 3D-AD, MVTec LOCO, VisA, "
                             "BTAD), an archive of one (.tar, .tar.gz, .tar.xz, .zip) or a folder-spec .yaml/.json")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = command_parser("nexvitad run", __doc__)
    add_config_arguments(parser)
    parser.add_argument("--split", default=None,
                        help="SOURCE/TARGET class counts, e.g. 11/1 (default: all classes but one as source)")
    parser.add_argument("--target", default=None, help="fix the target classes, e.g. hazelnut or bottle,cable")
    parser.add_argument("--target-data", default=None,
                        help="take the target classes from this dataset (cross-dataset run; --data gives the "
                             "source classes)")
    parser.add_argument("--seed", type=int, default=None, help="split, few-shot images and init (default: config)")
    parser.add_argument("--workdir", default="runs/default", help="outputs and checkpoints (default runs/default)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"inference paths, comma-separated (default {','.join(METHODS)})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--rescore", action="store_true",
                        help="redo the inference of a finished run (memory banks, maps, metrics) from its trained "
                             "checkpoints; without it a finished run is only reported")
    return parser.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The RunSpec of `nexvitad run`'s parsed arguments."""
    return RunSpec(load_config(args.config, args.overrides), data=args.data, split=args.split, target=args.target,
                   seed=args.seed, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                   target_data=args.target_data)


def main(argv: list[str]) -> int:
    from nexvitad_jax.distributed import initialize_distributed
    from nexvitad_jax.report import results_markdown

    began = time.perf_counter()
    args = parse_args(argv)
    spec = spec_from_args(args)
    initialize_distributed()
    results = run(spec, args.workdir, progress=not args.no_progress, rescore=args.rescore,
                  log=lambda message: print(message, file=sys.stderr))
    print(results_markdown(results))
    if isinstance(results, EarlierResults):
        return 0
    print(f"nexvitad run: done in {time.perf_counter() - began:.0f} s; metrics.json, results.md, heatmaps/ and "
          f"report.html in {args.workdir}", file=sys.stderr)
    return 0
