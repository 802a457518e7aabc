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

`--devices-per-run K` fills a host: its devices are cut into groups of K and each group runs one
run at a time, in its own subprocess that sees only those devices (`device_environment`:
CUDA_VISIBLE_DEVICES on GPUs, as many fake devices on CPU). A subprocess is the same experiment
command with `--only NAME` (results, resume and the compilation cache are the same files as one by
one); its output goes to runs/NAME/log.txt. On an 8-GPU node `--devices-per-run 1` runs 8 at a time:

    python -m experiments.table1 --config paper --data PATH/TO/mvtec --out runs/table1 --seeds 20 \
        --devices-per-run 1 --shard 0/4                   # node 0 of 4 (SLURM: $SLURM_PROCID/$SLURM_NTASKS)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from nexvitad_jax import signals
from nexvitad_jax.cli import describe_os_error, signal_name
from nexvitad_jax.config import config_dict
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.identity import describe_differences, identity_key
from nexvitad_jax.io import atomic_write
from nexvitad_jax.lock import release_workdir, workdir_lock
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


def named_runs(runs: Sequence[Run], names: Sequence[str]) -> list[Run]:
    """The runs called `names` (--only), in the experiment's order."""
    known = {run.name for run in runs}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UserInputError(f"--only {','.join(names)!r}: no run called {', '.join(unknown) or '(nothing)'}; "
                             f"the runs are {', '.join(run.name for run in runs)}")
    return [run for run in runs if run.name in set(names)]


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
    """Run `run` under the lock of its folder (a second process on it is refused, naming the holder:
    WorkdirBusy, exit status 2) and write its record; one finished meanwhile is read back."""
    with workdir_lock(Path(out) / "runs" / run.name, notice=lambda message: print(message, file=sys.stderr),
                      what="experiment run"):
        record = read_record(out, run)
        if record is not None:
            return record
        try:
            return _execute(out, run, progress)
        finally:
            release_workdir(Path(out) / "runs" / run.name / "work")  # the main job's own lock, if it took one


def _execute(out: Path, run: Run, progress: bool) -> dict[str, Any]:
    workdir = Path(out) / "runs" / run.name / "work"
    began = time.perf_counter()
    result = run.execute(workdir, progress)
    record = {"format": RECORD_FORMAT, "name": run.name, "key": run.key(), "params": run.params,
              "config": config_dict(run.config), "result": result, "wall_s": time.perf_counter() - began,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node()}
    atomic_write(result_path(out, run), json.dumps(record, indent=1, default=float) + "\n")
    return record


class RunsFailed(RuntimeError):
    """Runs started in subprocesses (--devices-per-run) that failed; the others finished."""


def run_experiment(experiment: Experiment, out: str | Path, *, shard: tuple[int, int] = (0, 1),
                   only: Sequence[str] | None = None, aggregate_only: bool = False, progress: bool = True,
                   log=print, groups: DeviceGroups | None = None) -> dict[str, Any] | None:
    """Run this shard's unfinished runs (or the runs named `only`) one by one here, or several at
    once in subprocesses on `groups`, then aggregate every finished run and return the aggregate
    (None with `only`: the full invocation aggregates). Failed subprocess runs raise RunsFailed
    after the aggregate of the others."""
    out = Path(out)
    names = [run.name for run in experiment.runs]
    if len(set(names)) != len(names):
        raise ValueError(f"experiment {experiment.name}: run names must be unique: {names}")
    failed = []
    if not aggregate_only:
        mine = named_runs(experiment.runs, only) if only else shard_runs(experiment.runs, *shard)
        check_configs(experiment.name, mine)  # every run's config, before any run starts
        log(f"{experiment.name}: {'runs ' + ','.join(only) if only else f'shard {shard[0]}/{shard[1]}'}: "
            f"{len(mine)} of {len(experiment.runs)} runs; outputs in {out}")
        pending = []
        for position, run in enumerate(mine, 1):
            prefix = f"{experiment.name}: [{position}/{len(mine)}] {run.name}"
            if read_record(out, run) is not None:
                log(f"{prefix}: finished earlier (skipped)")
            elif groups is None:
                log(f"{prefix}: running")
                record = execute_run(out, run, progress)
                log(f"{prefix}: done in {record['wall_s']:.0f} s")
            else:
                pending.append((prefix, run))
        failed = groups.run(out, pending, log) if groups is not None else []
    aggregate = None if only else write_aggregate(experiment, out)
    if failed:
        raise RunsFailed(f"{len(failed)} run(s) failed: " + "; ".join(failed))
    return aggregate


def check_configs(name: str, runs: Sequence[Run]) -> None:
    """One UserInputError listing the problems of every run's project config (each distinct one
    once); runs whose config is not a project config (a plain dict, say) are not checked here."""
    from ml_collections import ConfigDict

    from nexvitad_jax.config import config_problems, problems_error

    problems = list(dict.fromkeys(problem for run in runs if isinstance(run.config, ConfigDict)
                                  for problem in config_problems(run.config)))
    if problems:
        raise problems_error(problems, f"experiment {name}: config")


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


# ----------------------------------------------------------------------------- several runs at once


def device_groups(count: int, per_run: int) -> list[list[int]]:
    """This host's `count` devices cut into groups of `per_run` (indices; a remainder stays idle)."""
    if per_run < 1 or per_run > count:
        raise UserInputError(f"--devices-per-run {per_run}: expected 1 to {count} (the devices of this host)")
    return [list(range(start, start + per_run)) for start in range(0, count - per_run + 1, per_run)]


def device_environment(group: Sequence[int], platform_name: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of a subprocess that sees only the devices `group` (indices among this host's
    devices of `platform_name`, as `jax.local_devices()` lists them): on GPUs CUDA_VISIBLE_DEVICES
    (those of `environ`'s list, if it has one), on CPU as many fake devices (XLA_FLAGS)."""
    env = dict(environ)
    if platform_name == "cpu":
        flags = [flag for flag in env.get("XLA_FLAGS", "").split()
                 if not flag.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={len(group)}"])
        env["JAX_PLATFORMS"] = "cpu"
    elif platform_name == "gpu":
        visible = [device for device in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if device.strip()]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] if visible else str(i) for i in group)
    else:
        raise UserInputError(f"--devices-per-run: device groups are made for GPUs (CUDA_VISIBLE_DEVICES) and CPUs, "
                             f"not {platform_name}; run one experiment command per host instead")
    return env


def local_devices(environ: Mapping[str, str]) -> tuple[str, int]:
    """(platform, count) of this host's devices, asked of a fresh Python: the process that starts
    the runs never initializes the accelerators (XLA would take most of each GPU's memory)."""
    code = "import jax; devices = jax.local_devices(); print(devices[0].platform, len(devices))"
    done = subprocess.run([sys.executable, "-c", code], env=dict(environ), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"could not list this host's devices: {done.stderr[-2000:]}")
    platform_name, count = done.stdout.split()[-2:]
    return platform_name, int(count)


def experiment_command(build: Callable) -> list[str]:
    """The command that started this experiment (`python -m experiments.NAME`), to start its runs."""
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    if spec is None or getattr(main_module, "build", None) is not build:
        raise UserInputError("--devices-per-run: start the experiment as `python -m experiments.NAME ...`; its runs "
                             "are started the same way, one subprocess per device group")
    return [sys.executable, "-m", spec.name]


def _die_with_parent() -> Callable[[], None] | None:
    """What a run's subprocess runs before its command (Linux): it is killed when the experiment
    that started it dies, so that a killed experiment leaves no run behind to race its restart in
    the same workdir. Resolved here, so that the forked child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclasses.dataclass
class _Child:
    prefix: str
    run: Run
    process: subprocess.Popen
    log_path: Path
    began: float


@dataclasses.dataclass(frozen=True)
class DeviceGroups:
    """Runs several at once: each group of devices runs one run at a time, in a subprocess started
    as `command + [--only NAME, ...]` with an environment that shows it only its devices."""

    command: list[str]
    groups: list[list[int]]
    platform: str
    environ: Mapping[str, str]

    @classmethod
    def for_host(cls, command: list[str], per_run: int, environ: Mapping[str, str] = os.environ) -> "DeviceGroups":
        platform_name, count = local_devices(environ)
        return cls(list(command), device_groups(count, per_run), platform_name, dict(environ))

    def run(self, out: Path, pending: list[tuple[str, Run]], log) -> list[str]:
        """Every pending (log prefix, run), as groups come free; returns the failures' descriptions."""
        queue, running, failed = list(pending), {}, []
        try:
            while queue or running:
                for index, group in enumerate(self.groups):
                    if index not in running and queue:
                        running[index] = self._start(out, *queue.pop(0), group, log)
                time.sleep(0.2)
                for index, child in list(running.items()):
                    if child.process.poll() is not None:
                        del running[index]
                        failed += self._finished(out, child, log)
        finally:
            for child in running.values():  # interrupted: no run outlives the experiment
                child.process.kill()
                child.process.wait()
        return failed

    def _start(self, out: Path, prefix: str, run: Run, group: list[int], log) -> _Child:
        log_path = Path(out) / "runs" / run.name / "log.txt"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [*self.command, "--only", run.name, "--devices-per-run", "0", "--no-progress"]
        with open(log_path, "a") as handle:  # the subprocess keeps its own descriptor
            process = subprocess.Popen(command, env=device_environment(group, self.platform, self.environ),
                                       stdout=handle, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent())
        log(f"{prefix}: running on {self.platform} device(s) {','.join(map(str, group))} (log {log_path})")
        return _Child(prefix, run, process, log_path, time.perf_counter())

    @staticmethod
    def _finished(out: Path, child: _Child, log) -> list[str]:
        seconds = time.perf_counter() - child.began
        if child.process.returncode == 0 and result_path(out, child.run).is_file():
            log(f"{child.prefix}: done in {seconds:.0f} s")
            return []
        tail = "\n".join(child.log_path.read_text(errors="replace").splitlines()[-20:])
        log(f"{child.prefix}: FAILED (exit status {child.process.returncode}) after {seconds:.0f} s; the end of "
            f"{child.log_path}:\n{tail}")
        return [f"{child.run.name} (exit status {child.process.returncode}, log {child.log_path})"]


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
    parser.add_argument("--target-data", default=None, metavar="PATH",
                        help="take the target classes from this dataset (cross-dataset runs; --data gives the "
                             "source classes; --splits a/b draws b of its classes)")
    parser.add_argument("--out", required=True, help="output folder (runs/, aggregate JSON, Markdown, plots)")
    parser.add_argument("--shard", default="0/1", help="I/N: run the runs whose index is I mod N (default 0/1: all)")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="run nothing; aggregate the results in OUT/runs (the host that gathers shards)")
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="JAX persistent compilation cache (default OUT/compile_cache; 'none' disables; "
                             "share one DIR between experiments to compile common programs once)")
    parser.add_argument("--devices-per-run", type=int, default=0, metavar="K",
                        help="run several runs at once, each in its own subprocess on K of this host's devices "
                             "(e.g. 1 on an 8-GPU node: 8 at a time); default 0: one run at a time on every device")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME...]",
                        help="run only these runs (whatever --shard) and aggregate nothing; how --devices-per-run "
                             "starts each run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _where_runs_go(args: argparse.Namespace, build: Callable, argv: Sequence[str]) -> DeviceGroups | None:
    """The device groups of --devices-per-run (this process then only starts runs: it leaves the
    accelerators to them), or None: the runs go here, with the compilation cache."""
    if args.devices_per_run < 0:
        raise UserInputError(f"--devices-per-run {args.devices_per_run}: expected 0 (off) or a device count")
    if args.devices_per_run and not args.aggregate_only:
        import jax

        groups = DeviceGroups.for_host([*experiment_command(build), *argv], args.devices_per_run)
        jax.config.update("jax_platforms", "cpu")
        return groups
    cache = args.compile_cache or os.path.join(args.out, "compile_cache")
    if cache.lower() != "none" and not args.aggregate_only:
        enable_compile_cache(cache)
    return None


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

    handlers = signals.install()  # SIGINT/SIGTERM: one line, exit 130/143, the runs resume
    try:
        shard = parse_shard(args.shard)
        only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only is not None else None
        groups = _where_runs_go(args, build, sys.argv[1:] if argv is None else argv)
        experiment = build(args)
        aggregate = run_experiment(experiment, args.out, shard=shard, only=only, aggregate_only=args.aggregate_only,
                                   progress=not args.no_progress, log=log, groups=groups)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunsFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk, a read-only folder: one line naming the path
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        signals.ignore_further()
        print(f"interrupted ({signal_name(error)}); run the same command again to resume", file=sys.stderr)
        if argv is None:  # the script itself: out at once (no interpreter teardown under JAX's threads)
            signals.exit_now(signals.exit_status(error))
        return signals.exit_status(error)
    finally:
        signals.restore(handlers)
    if aggregate is None:
        return 0
    print(Path(args.out, f"{experiment.name}.md").read_text())
    log(f"{experiment.name}: {len(aggregate['finished'])} of {len(experiment.runs)} runs aggregated into "
        f"{Path(args.out, experiment.name)}.json/.md")
    return 0
