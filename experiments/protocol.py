"""What the paper's experiments share: runs of the main job over splits x seeds x variants, and their
statistics over seeds (mean, sample std, best), Markdown tables and plots.

The paper repeats each configuration over random splits and reports the best value (section 4.3);
here every group of runs reports mean +- std (sample standard deviation, ddof = 1; none with one
seed) and the best, per metric: the best AUROC and the best AP of a split may come from different
seeds (the seed of each best is in the JSON).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from experiments.runner import Experiment, Run
from nexvitad_jax.config import load_config, uses_random_backbones, with_changes
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.report import COLUMNS, METHOD_NAMES, percent

PAPER_SPLITS = ("11/1", "10/2", "9/3", "8/4")
# The paper's figures show these three; the tables add AUPRO and image AUROC.
PLOT_METRICS = (("pixel_auroc", "pixel AUROC"), ("pixel_ap", "AP"), ("pro_iou", "PRO-IoU"))
LABELS = {"split": "split", "seed": "seed", "variant": "variant", "method": "inference", "k": "K"}


def protocol_arguments(parser: argparse.ArgumentParser, *, seeds: int = 1) -> None:
    parser.add_argument("--splits", default=",".join(PAPER_SPLITS),
                        help=f"comma-separated SOURCE/TARGET splits (default {','.join(PAPER_SPLITS)})")
    parser.add_argument("--seeds", type=int, default=seeds,
                        help=f"seeds 0..N-1 per split: class draw, few-shot images, init (default {seeds})")


def splits_and_seeds(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    from nexvitad_jax.data import parse_split

    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    for split in splits:
        parse_split(split)
    if not splits:
        raise UserInputError(f"--splits {args.splits!r}: expected at least one split such as 11/1")
    if args.seeds < 1:
        raise UserInputError(f"--seeds {args.seeds}: expected a positive number of seeds")
    return splits, list(range(args.seeds))


def positive_integers(text: str, option: str) -> list[int]:
    """"5,10,20" -> [5, 10, 20]; anything else is the user's mistake."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserInputError(f"{option} {text!r}: expected comma-separated positive integers, e.g. 5,10,20")
    return values


def run_name(split: str, seed: int, variant: str | None = None) -> str:
    return f"split{split.replace('/', '-')}_seed{seed}" + (f"_{variant}" if variant else "")


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """{"target_data": PATH} for a cross-dataset experiment (--target-data), else {}: runs of one
    dataset keep their params (and so their saved results) as they were."""
    target_data = getattr(args, "target_data", None)
    return {} if target_data is None else {"target_data": str(target_data)}


def protocol_runs(args: argparse.Namespace, variants: Mapping[str, Mapping[str, Any]], execute,
                  **options) -> list[Run]:
    """One run per split x seed x variant: `execute(workdir, progress, config=, data=, split=, seed=,
    [target_data=,] **options)`. A variant is config changes ({"train.lambda1": 0.0}) on top of
    --config/--set; a single variant named "" leaves the run names without one. With --target-data
    the source classes come from --data and the target classes from the target data."""
    base = load_config(args.config, args.overrides)
    splits, seeds = splits_and_seeds(args)
    options = {**data_options(args), **options}
    runs = []
    for split in splits:
        for seed in seeds:
            for variant, changes in variants.items():
                config = with_changes(base, {**changes, "seed": seed})
                params = {"data": str(args.data), "split": split, "seed": seed, "variant": variant,
                          "changes": dict(changes), **options}
                runs.append(Run(run_name(split, seed, variant), params, config,
                                functools.partial(execute, config=config, data=args.data, split=split, seed=seed,
                                                  **options)))
    return runs


def execute_main_job(workdir: Path, progress: bool, *, config, data: str, split: str, seed: int,
                     methods: Sequence[str], target_data: str | None = None) -> dict[str, Any]:
    """One `nexvitad run` (its metrics.json without the config, which the run's record holds)."""
    from nexvitad_jax.run import RANDOM_BACKBONE_NOTICE, RunSpec, run

    def log(message: str) -> None:  # the aggregate says it once; the rest goes to stderr
        if message != RANDOM_BACKBONE_NOTICE:
            print(f"  {message}", file=sys.stderr, flush=True)

    spec = RunSpec(config, data=data, split=split, seed=seed, methods=tuple(methods), target_data=target_data)
    results = run(spec, workdir, progress=progress, log=log)
    return {key: value for key, value in results.items() if key != "config"}


def main_job_runs(args: argparse.Namespace, variants: Mapping[str, Mapping[str, Any]],
                  methods: Sequence[str] = ("memory_bank", "decoder")) -> list[Run]:
    """`nexvitad run` per split x seed x variant."""
    return protocol_runs(args, variants, execute_main_job, methods=list(methods))


def main_job_experiment(name: str, title: str, variants: Mapping[str, Mapping[str, Any]], aggregate, plot):
    """The `build(args)` of an experiment of main-job runs, split x seed x variant."""
    return lambda args: Experiment(name, title, main_job_runs(args, variants), aggregate, plot)


def main_job_rows(records: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per (run, inference method): the run's params and its metrics, mean over target classes."""
    rows = []
    for record in records:
        params, result = record["params"], record["result"]
        for method, metrics in result["mean"].items():
            rows.append({"split": params["split"], "seed": params["seed"], "variant": params.get("variant", ""),
                         "method": method, **metrics})
    return rows


# ----------------------------------------------------------------------------- statistics


def metric_stats(values: Sequence[float | None], seeds: Sequence[int]) -> dict[str, Any]:
    """mean, sample std (ddof = 1; None with fewer than two values) and best (max) of the defined
    values, with the seed of the best."""
    defined = [(v, s) for v, s in zip(values, seeds) if v is not None]
    if not defined:
        return {"n": 0, "mean": None, "std": None, "best": None, "best_seed": None, "values": list(values)}
    array = np.asarray([v for v, _ in defined], np.float64)
    best = int(np.argmax(array))
    return {"n": len(array), "mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else None,
            "best": float(array[best]), "best_seed": defined[best][1], "values": list(values)}


def summarize(rows: Sequence[dict[str, Any]], by: Sequence[str],
              metrics: Sequence[str] = tuple(name for name, _ in COLUMNS)) -> list[dict[str, Any]]:
    """Groups of rows with equal `by` fields (in first-seen order), each with the stats of every metric."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in by), []).append(row)
    summary = []
    for key, members in groups.items():
        seeds = [row["seed"] for row in members]
        summary.append({**dict(zip(by, key)), "seeds": seeds,
                        "metrics": {name: metric_stats([row.get(name) for row in members], seeds) for name in metrics}})
    return summary


def _label(field: str, value: Any) -> str:
    if field == "method":
        return METHOD_NAMES.get(value, value)
    return str(value)


def mean_std(stats: Mapping[str, Any]) -> str:
    if stats["mean"] is None:
        return "n/a"
    return percent(stats["mean"]) + ("" if stats["std"] is None else f" ± {100.0 * stats['std']:.1f}")


def stats_table(groups: Sequence[dict[str, Any]], by: Sequence[str], statistic: str = "best") -> str:
    """Markdown: the `by` columns, the seed count, then each metric's best or mean ± std (in %)."""
    headers = [LABELS.get(field, field) for field in by] + ["seeds"] + [title for _, title in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for group in groups:
        cells = [_label(field, group[field]) for field in by] + [str(len(group["seeds"]))]
        for name, _ in COLUMNS:
            stats = group["metrics"][name]
            cells.append(percent(stats["best"]) if statistic == "best" else mean_std(stats))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(groups: Sequence[dict[str, Any]], by: Sequence[str]) -> str:
    if all(len(group["seeds"]) == 1 for group in groups):
        return "## One seed per group, %\n\n" + stats_table(groups, by, "best") + "\n"
    return ("## Best over seeds (the paper reports the best), %\n\n" + stats_table(groups, by, "best")
            + "\n## Mean ± std over seeds, %\n\n" + stats_table(groups, by, "mean") + "\n")


def aggregate_runs(records: Sequence[dict], *, by: Sequence[str], note: str = "", footer: str = "") -> tuple[dict, str]:
    """The `Experiment.aggregate` of main-job runs: stats per `by` group, Markdown tables between `note`
    and `footer`."""
    groups = summarize(main_job_rows(records), by)
    return {"by": list(by), "groups": groups}, random_backbone_note(records) + note + summary_markdown(groups, by) + footer


def random_backbone_note(records: Sequence[dict]) -> str:
    if any(uses_random_backbones(record["config"]) for record in records):
        return ("These runs use RANDOMLY INITIALIZED backbones (no pretrained weights): the figures check the "
                "pipeline, they are not the paper's accuracy.\n\n")
    return ""


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path, title: str) -> Path:
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    _pyplot().close(figure)
    return path


def grouped_bars(groups: Sequence[dict[str, Any]], series: Sequence[str], path: Path, title: str,
                 metrics: Sequence[tuple[str, str]] = PLOT_METRICS) -> Path:
    """One panel per metric: splits on x, one bar per `series` value (mean, std as error bar), a
    black dot at the best."""
    plt = _pyplot()
    splits = list(dict.fromkeys(group["split"] for group in groups))
    names = list(dict.fromkeys(tuple(group[field] for field in series) for group in groups))
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    width = 0.8 / max(len(names), 1)
    for axis, (metric, metric_title) in zip(axes[0], metrics):
        for index, name in enumerate(names):
            xs, means, stds, bests = [], [], [], []
            for position, split in enumerate(splits):
                group = next((g for g in groups if g["split"] == split
                              and tuple(g[field] for field in series) == name), None)
                if group is None or group["metrics"][metric]["mean"] is None:
                    continue
                stats = group["metrics"][metric]
                xs.append(position + (index - (len(names) - 1) / 2) * width)
                means.append(100 * stats["mean"])
                stds.append(100 * (stats["std"] or 0.0))
                bests.append(100 * stats["best"])
            label = ", ".join(_label(field, value) for field, value in zip(series, name))
            axis.bar(xs, means, width, yerr=stds, capsize=2, label=label)
            axis.plot(xs, bests, "k.", markersize=5)
        axis.set_xticks(range(len(splits)), splits)
        axis.set_xlabel("source/target split")
        axis.set_ylabel(f"{metric_title} (%)")
        axis.set_title(metric_title)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(figure, path, f"{title} (bars: mean ± std over seeds; dots: best)")


def metric_series(groups: Sequence[dict[str, Any]], by: str, x: str, metric: str,
                  label: Callable[[Any], str] = str) -> dict[str, tuple]:
    """{label(value of `by`): (xs, mean %, std %)} of the groups whose `metric` has a mean, one
    series per value of `by` in order of first appearance, for `line_panels`."""
    series = {}
    for value in dict.fromkeys(group[by] for group in groups):
        mine = [g for g in groups if g[by] == value and g["metrics"][metric]["mean"] is not None]
        series[label(value)] = ([g[x] for g in mine], [100 * g["metrics"][metric]["mean"] for g in mine],
                                [100 * (g["metrics"][metric]["std"] or 0.0) for g in mine])
    return series


def line_panels(panels: Sequence[tuple[str, str, Mapping[str, tuple]]], path: Path, xlabel: str, title: str) -> Path:
    """One panel per (panel title, y label, {series label: (xs, ys, y errors or None)}), lines with
    markers and error bars."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for axis, (panel_title, ylabel, series) in zip(axes[0], panels):
        for label, (xs, ys, errors) in series.items():
            axis.errorbar(xs, ys, yerr=errors, marker="o", markersize=4, capsize=2, label=label)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.set_title(panel_title)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(figure, path, title)
