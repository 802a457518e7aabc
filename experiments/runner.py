"""The experiment runner behind every experiment script: named runs, split across hosts, resumable,
aggregated into JSON + Markdown + PNG plots.

    python -m experiments.table1 --out runs/table1 --seeds 5 --shard 0/2   # host 0 (host 1: --shard 1/2)
    python -m experiments.table1 --out runs/table1 --seeds 5 --aggregate-only  # after gathering runs/

An experiment script builds an `Experiment` (its list of named runs and how to aggregate their
results) from its arguments and hands it to `main`. The layout of OUT:

    runs/NAME/result.json  the run's result with its params and config, written atomically when the
                           run ends. A run whose result exists is skipped, so a killed experiment resumes
                           from its finished runs; a result of another config or params is refused.
    runs/NAME/work/        the run's workdir: a half-finished run resumes through the main job's own
                           resume (training checkpoints, per-class results).
    compile_cache/         JAX's persistent compilation cache (the default --compile-cache): runs of
                           the same shapes compile once, across runs, restarts and shards on a host.
    NAME.json, NAME.md, NAME*.png   aggregated from whatever results exist once this host's runs
                           are done (--aggregate-only does only this, on the host that gathers shards).

`--shard i/n` takes the runs whose index in the experiment's list is i mod n, so n hosts running the
same command with i = 0..n-1 split the experiment between them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from nexvitad_jax.config import config_dict
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.identity import describe_differences, identity_key
from nexvitad_jax.io import atomic_write
from nexvitad_jax.run import add_config_arguments

RECORD_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Run:
    """One named run: `execute(workdir, progress)` -> a JSON-able result."""

    name: str
    params: dict[str, Any]  # what the run is (split, seed, variant, ...); the aggregation reads these
    config: Any  # the run's config: stored with its result (results carry their config)
    execute: Callable[[Path, bool], dict[str, Any]]

    def key(self) -> str:
        return identity_key({"params": self.params, "config": config_dict(self.config)})


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A named list of runs; `aggregate(records) -> (summary, markdown)` and `plot(summary, out)`
    -> PNG paths turn the finished runs' records into the experiment's outputs."""

    name: str
    title: str
    runs: list[Run]
    aggregate: Callable[[list[dict]], tuple[dict[str, Any], str]]
    plot: Callable[[dict[str, Any], Path], list[Path]] = lambda summary, out: []


# ----------------------------------------------------------------------------- running


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n."""
    index, sep, count = str(text).partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        index = count = -1
    if not sep or count < 1 or not 0 <= index < count:
        raise UserInputError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/2 and 1/2 for two hosts")
    return index, count


def shard_runs(runs: Sequence[Run], index: int, count: int) -> list[Run]:
    """The runs of shard `index` of `count`: those whose position in `runs` is index mod count."""
    return [run for position, run in enumerate(runs) if position % count == index]


def result_path(out: Path, run: Run) -> Path:
    return Path(out) / "runs" / run.name / "result.json"


def read_record(out: Path, run: Run) -> dict[str, Any] | None:
    """The finished run's record, None if it has not finished; a record of another run is refused."""
    path = result_path(out, run)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path}: not valid JSON ({error}); delete it to recompute the run") from error
    if record.get("key") != run.key():
        current = {"params": run.params, "config": config_dict(run.config)}
        saved = {"params": record.get("params"), "config": record.get("config")}
        differences = describe_differences(saved, json.loads(json.dumps(current, default=str)), what="saved result")
        raise UserInputError(f"{path} holds a result of another run (differences: "
                             f"{'; '.join(differences) or 'format'}); use a new --out, or delete it to recompute")
    return record


def execute_run(out: Path, run: Run, progress: bool) -> dict[str, Any]:
    workdir = Path(out) / "runs" / run.name / "work"
    began = time.perf_counter()
    result = run.execute(workdir, progress)
    record = {"format": RECORD_FORMAT, "name": run.name, "key": run.key(), "params": run.params,
              "config": config_dict(run.config), "result": result, "wall_s": time.perf_counter() - began,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node()}
    atomic_write(result_path(out, run), json.dumps(record, indent=1, default=float) + "\n")
    return record


def run_experiment(experiment: Experiment, out: str | Path, *, shard: tuple[int, int] = (0, 1),
                   aggregate_only: bool = False, progress: bool = True, log=print) -> dict[str, Any]:
    """Run this shard's unfinished runs, then aggregate every finished run; returns the aggregate."""
    out = Path(out)
    names = [run.name for run in experiment.runs]
    if len(set(names)) != len(names):
        raise ValueError(f"experiment {experiment.name}: run names must be unique: {names}")
    if not aggregate_only:
        mine = shard_runs(experiment.runs, *shard)
        log(f"{experiment.name}: shard {shard[0]}/{shard[1]}: {len(mine)} of {len(experiment.runs)} runs; "
            f"outputs in {out}")
        for position, run in enumerate(mine, 1):
            if read_record(out, run) is not None:
                log(f"{experiment.name}: [{position}/{len(mine)}] {run.name}: finished earlier (skipped)")
                continue
            log(f"{experiment.name}: [{position}/{len(mine)}] {run.name}: running")
            record = execute_run(out, run, progress)
            log(f"{experiment.name}: [{position}/{len(mine)}] {run.name}: done in {record['wall_s']:.0f} s")
    return write_aggregate(experiment, out)


def write_aggregate(experiment: Experiment, out: Path) -> dict[str, Any]:
    """OUT/NAME.json, .md and plots from the records that exist (the missing runs are listed)."""
    records, missing = [], []
    for run in experiment.runs:
        record = read_record(out, run)
        (records.append(record) if record is not None else missing.append(run.name))
    summary, markdown = experiment.aggregate(records) if records else ({}, "No run has finished yet.\n")
    configs: list[dict[str, Any]] = []
    for record in records:  # each distinct config once, with the runs that used it
        match = next((c for c in configs if c["config"] == record["config"]), None)
        if match is None:
            configs.append({"runs": [record["name"]], "config": record["config"]})
        else:
            match["runs"].append(record["name"])
    aggregate = {"format": RECORD_FORMAT, "experiment": experiment.name, "title": experiment.title,
                 "finished": [r["name"] for r in records], "missing": missing, "summary": summary,
                 "configs": configs}
    status = f"{len(records)} of {len(experiment.runs)} runs finished" + (
        f"; missing: {', '.join(missing)}" if missing else "") + "."
    out.mkdir(parents=True, exist_ok=True)
    plots = experiment.plot(summary, out) if records else []
    images = "".join(f"\n![{path.stem}]({path.name})\n" for path in plots)
    atomic_write(out / f"{experiment.name}.json", json.dumps(aggregate, indent=1, default=float) + "\n")
    atomic_write(out / f"{experiment.name}.md", f"# {experiment.title}\n\n{status}\n\n{markdown}{images}")
    return aggregate


# ----------------------------------------------------------------------------- command line


def enable_compile_cache(directory: str | Path) -> None:
    """JAX's persistent compilation cache in `directory`, for every program (the tiny config's
    programs compile in well under the default one-second threshold, and they are most of a run)."""
    import jax

    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def experiment_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (runs/, aggregate JSON, Markdown, plots)")
    parser.add_argument("--shard", default="0/1", help="I/N: run the runs whose index is I mod N (default 0/1: all)")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="run nothing; aggregate the results in OUT/runs (the host that gathers shards)")
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="JAX persistent compilation cache (default OUT/compile_cache; 'none' disables; "
                             "share one DIR between experiments to compile common programs once)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(build: Callable[[argparse.Namespace], Experiment], argv: Sequence[str] | None, doc: str,
         arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None) -> int:
    """The command line of an experiment script: `build(args)` makes its Experiment."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(doc.split("\n\n")[1:]))
    experiment_arguments(parser)
    arguments(parser)
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        shard = parse_shard(args.shard)
        cache = args.compile_cache or os.path.join(args.out, "compile_cache")
        if cache.lower() != "none" and not args.aggregate_only:
            enable_compile_cache(cache)
        experiment = build(args)
        aggregate = run_experiment(experiment, args.out, shard=shard, aggregate_only=args.aggregate_only,
                              progress=not args.no_progress, log=log)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(Path(args.out, f"{experiment.name}.md").read_text())
    log(f"{experiment.name}: {len(aggregate['finished'])} of {len(experiment.runs)} runs aggregated into "
        f"{Path(args.out, experiment.name)}.json/.md")
    return 0
