"""Rebuild report.html of a main-job workdir: `nexvitad report WORKDIR [--tensorboard]`.

    nexvitad report runs/default                 # WORKDIR/report.html
    nexvitad report runs/default --tensorboard   # also WORKDIR/train/tensorboard (tensorboardX)

report.html is one self-contained file (images embedded as base64 PNG, no external CSS or scripts):
the run's Table 1 row and per-class tables, every heatmap grid (heatmaps/CLASS.png), the training
curves (train/metrics.jsonl), the plots of the experiment the run belongs to (an experiment keeps a
run's workdir in OUT/runs/NAME/work and its plots in OUT), and the config. It reads only what the
workdir holds, so it also reports a run that is still going or was stopped (what exists so far).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from nexvitad_jax.argparsing import command_parser
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.io import atomic_write
from nexvitad_jax.report import (COLUMNS, METHOD_NAMES, ORACLE_THRESHOLD, percent, read_training_log,
                                 training_curves_png, write_tensorboard)

REPORT_NAME = "report.html"
STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1800px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
th { background: #eee; } td.text, th.text { text-align: left; }
figure { margin: 12px 0; overflow-x: auto; } figcaption { font-size: 0.85em; color: #444; max-width: 1000px; }
img { display: block; } pre { background: #f6f6f6; padding: 8px; font-size: 0.8em; overflow-x: auto; }
.warning { color: #a00; font-weight: bold; }
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], text_columns: int, caption: str = "") -> str:
    """An HTML table; the first `text_columns` columns are left-aligned text."""
    def cell(tag: str, index: int, value: Any) -> str:
        kind = ' class="text"' if index < text_columns else ""
        return f"<{tag}{kind}>{html.escape(str(value))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    title = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metric_cells(metrics: Mapping[str, Any]) -> list[str]:
    return [percent(metrics.get(name)) for name, _ in COLUMNS]


def _image(data: bytes, alt: str, caption: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


# ----------------------------------------------------------------------------- what the workdir holds


def read_workdir(workdir: Path) -> dict[str, Any]:
    """metrics.json (the finished run) or, while it runs, run.json's identity and classes/*.json."""
    if not workdir.is_dir():
        raise UserInputError(f"{workdir}: no such directory (expected the workdir of a `nexvitad run`)")
    if not (workdir / "run.json").is_file() and not (workdir / "metrics.json").is_file():
        raise UserInputError(f"{workdir}: holds no run.json or metrics.json; expected the workdir of a `nexvitad run`")
    if (workdir / "metrics.json").is_file():
        results = json.loads((workdir / "metrics.json").read_text())
    else:
        identity = json.loads((workdir / "run.json").read_text()).get("identity", {})
        results = {"data": identity.get("data"), "seed": identity.get("seed"), "source": identity.get("source", []),
                   "target": identity.get("target", []), "config": identity.get("config", {}), "unfinished": True}
        results["split"] = f"{len(results['source'])}/{len(results['target'])}"
    results["records"] = {path.stem: json.loads(path.read_text())
                          for path in sorted((workdir / "classes").glob("*.json"))}
    return results


def experiment_plots(workdir: Path) -> list[Path]:
    """PNGs of the workdir itself and, for a run of an experiment (OUT/runs/NAME/work), of OUT."""
    places = [workdir]
    if workdir.parent.parent.name == "runs":
        places.append(workdir.parent.parent.parent)
    return [path for place in places for path in sorted(place.glob("*.png"))]


# ----------------------------------------------------------------------------- the sections


def summary_section(results: Mapping[str, Any]) -> str:
    target = ", ".join(results.get("target", []))
    parts = [f"<h1>NexViTAD run: split {html.escape(str(results.get('split')))}, target {html.escape(target)}, "
             f"seed {html.escape(str(results.get('seed')))}</h1>",
             f"<p>Data: <code>{html.escape(str(results.get('data')))}</code>; source classes: "
             f"{html.escape(', '.join(results.get('source', [])))}.</p>"]
    if results.get("unfinished"):
        parts.append('<p class="warning">The run has not finished (no metrics.json): this report shows what '
                     "the workdir holds so far.</p>")
    if results.get("random_backbones"):
        parts.append('<p class="warning">RANDOMLY INITIALIZED backbones: the figures show that the pipeline '
                     "works, not the paper's accuracy.</p>")
    if results.get("timings"):
        timings = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in results["timings"].items())
        parts.append(f"<p>{results.get('train_steps', '?')} training steps. Wall time: {html.escape(timings)}.</p>")
    return "\n".join(parts)


def tables_section(results: Mapping[str, Any]) -> str:
    """The Table 1 row (mean over the target classes) and one row per target class and path."""
    headers = [title for _, title in COLUMNS]
    parts = []
    methods = results.get("methods") or sorted({m for r in results["records"].values() for m in r.get("metrics", {})})
    if results.get("mean"):
        rows = [[results["split"], METHOD_NAMES.get(m, m), *_metric_cells(results["mean"][m])] for m in methods]
        parts += ['<h2 id="table-1-row">Table 1 row</h2>',
                  _table(["split", "inference", *headers], rows, 2, "mean over the target classes, %")]
    rows = []
    for category in results.get("target", []):
        record = results["records"].get(category)
        metrics = record["metrics"] if record else results.get("per_class", {}).get(category)
        if metrics is None:
            continue
        counts = [record.get("n_test", "") if record else "", record.get("n_anomalous", "") if record else ""]
        rows += [[category, METHOD_NAMES.get(m, m), *counts, *_metric_cells(metrics[m])]
                 for m in methods if m in metrics]
    if rows:
        parts += ['<h2 id="per-target-class">Per target class</h2>',
                  _table(["class", "inference", "test images", "anomalous", *headers], rows, 2, "%")]
    return "\n".join(parts)


def heatmaps_section(workdir: Path, results: Mapping[str, Any]) -> str:
    paths = sorted((workdir / "heatmaps").glob("*.png"),
                   key=lambda p: (list(results.get("target", [])) + [p.stem]).index(p.stem))
    if not paths:
        return ""
    caption = ("rows: every defect type, then good images; per inference path the raw map and its overlay on "
               f"one colour scale (colour bar below); decision: image score >= the {ORACLE_THRESHOLD}, "
               "as the run has no calibration")
    return '<h2 id="heatmaps">Heatmaps</h2>\n' + "\n".join(
        _image(p.read_bytes(), f"heatmaps of {p.stem}", f"{p.stem}: {caption}") for p in paths)


def training_section(workdir: Path) -> str:
    path = workdir / "train" / "metrics.jsonl"
    if not path.is_file():
        return ""
    records = read_training_log(path)
    if not records:
        return ""
    last = records[-1]
    values = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("step", "epoch", "phase")
                       and isinstance(v, (int, float)))
    note = f"{len(records)} steps (train/metrics.jsonl); the last: step {last['step']}, {values}."
    if (workdir / "train" / "tensorboard").is_dir():
        note += " TensorBoard: tensorboard --logdir " + str(workdir)
    return '<h2 id="training">Training</h2>\n' + _image(training_curves_png(records), "training curves", note)


def experiments_section(workdir: Path) -> str:
    plots = experiment_plots(workdir)
    if not plots:
        return ""
    return '<h2 id="experiment-plots">Experiment plots</h2>\n' + "\n".join(
        _image(p.read_bytes(), p.stem, p.name) for p in plots)


def flat_config(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(section.field, value) of a nested config, in its order (the names `--set` takes)."""
    items = []
    for name, value in config.items():
        if isinstance(value, Mapping):
            items += flat_config(value, f"{prefix}{name}.")
        else:
            items.append((f"{prefix}{name}", value))
    return items


def config_section(results: Mapping[str, Any]) -> str:
    if not results.get("config"):
        return ""
    rows = [(name, json.dumps(value)) for name, value in flat_config(results["config"])]
    return '<h2 id="config">Config</h2>\n' + _table(["field", "value"], rows, 2, "as run (--set FIELD=VALUE overrides)")


def build_report(workdir: str | Path) -> str:
    """report.html's text for `workdir`."""
    workdir = Path(workdir)
    results = read_workdir(workdir)
    sections = [summary_section(results), tables_section(results), heatmaps_section(workdir, results),
                training_section(workdir), experiments_section(workdir), config_section(results)]
    title = html.escape(f"NexViTAD report: {workdir.name}")
    found = re.findall(r'<h2 id="([^"]+)">([^<]+)</h2>', "".join(sections))
    contents = "<p>" + " | ".join(f'<a href="#{anchor}">{name}</a>' for anchor, name in found) + "</p>"
    body = "\n".join([sections[0], contents, *(s for s in sections[1:] if s)])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_report(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html (default WORKDIR/report.html); returns its path."""
    path = Path(out) if out is not None else Path(workdir) / REPORT_NAME
    atomic_write(path, build_report(workdir))
    return path


def main(argv: list[str]) -> int:
    parser = command_parser("nexvitad report", __doc__)
    parser.add_argument("workdir", help="the workdir of a `nexvitad run`")
    parser.add_argument("--out", default=None, help=f"where to write the report (default WORKDIR/{REPORT_NAME})")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also convert train/metrics.jsonl to TensorBoard event files in train/tensorboard")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    read_workdir(workdir)  # a workdir of a run, before anything is written
    if args.tensorboard:
        logdir = write_tensorboard(workdir / "train" / "metrics.jsonl")
        print(f"nexvitad report: TensorBoard events in {logdir} (tensorboard --logdir {workdir})")
    path = write_report(workdir, args.out)
    print(f"nexvitad report: {path}")
    return 0
