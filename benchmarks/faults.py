"""Fault benchmark: SIGKILL at random moments over a demo run (`nexvitad run --config tiny`) and a
small Table 1 sweep (`python -m experiments.table1 --config tiny`), each killed run resumed (the
same command again) until it finishes; then its final results are compared with those of an
uninterrupted run, and the workdir is searched for what a kill may leave behind (temporary files,
orbax's temporary checkpoint directories, lock files).

    python benchmarks/faults.py                       # 10 kills: 6 over demo runs, 4 over table1 sweeps
    python benchmarks/faults.py --kills 4 --out /tmp/faults   # fewer, elsewhere

Each kill is one trial: the command is started in a fresh workdir, killed (SIGKILL) after a time
drawn uniformly over the uninterrupted run's duration (so kills land in every stage: startup,
compilation, training, checkpoints, memory bank, scoring, report), then started again, and again
(up to --max-resumes more kills at half-way points) until it exits 0. Every process shares one JAX
compilation cache and one decoded-data cache (what a user's reruns share too).

Writes benchmarks/results/faults.json: per scenario the kills delivered, the trials that finished
("survived": the resumed command ended with status 0), those whose results equal the
uninterrupted run's (per-class metrics, exactly, and the largest difference of any metric), and
every file left behind. Two uninterrupted runs are compared the same way (`uninterrupted_runs`):
what differs between them is not the kills' doing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "faults.json"
LOCK_NAME = ".nexvitad.lock"


def demo_command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "nexvitad_jax.cli", "run", "--config", "tiny", "--workdir", str(workdir),
            "--no-progress"]


def table1_command(workdir: Path, compile_cache: Path) -> list[str]:
    return [sys.executable, "-m", "experiments.table1", "--config", "tiny", "--out", str(workdir), "--splits", "11/1",
            "--seeds", "2", "--no-progress", "--compile-cache", str(compile_cache)]


def demo_results(workdir: Path) -> dict:
    return json.loads((workdir / "metrics.json").read_text())["per_class"]


def table1_results(workdir: Path) -> dict:
    return {path.parent.name: json.loads(path.read_text())["result"]["per_class"]
            for path in sorted((workdir / "runs").glob("*/result.json"))}


def largest_difference(got, expected) -> float:
    """The largest absolute difference between two results' numbers (inf where their shapes differ).
    Runs of one config equal each other to ~1e-6, not always bitwise: a process that resumed a run
    can take another compiled path for the same inference (this benchmark measures it)."""
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return float("inf")
        return max([largest_difference(got[key], value) for key, value in expected.items()], default=0.0)
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        return abs(float(got) - float(expected))
    return 0.0 if got == expected else float("inf")


def left_behind(workdir: Path) -> list[str]:
    """Temporary files or directories and lock files still there after the command finished."""
    found = []
    for path in workdir.rglob("*"):
        if "compile_cache" in path.parts:
            continue
        if ".tmp" in path.name or "orbax-checkpoint-tmp" in path.name or path.name == LOCK_NAME:
            found.append(str(path.relative_to(workdir)))
    return sorted(found)


def run_to_the_end(command: list[str], env: dict, kill_after: list[float], log) -> dict:
    """Start `command`, SIGKILL it after each of `kill_after` seconds (one start each), then let the
    last start finish. Returns the kills delivered and the statuses."""
    delivered, statuses = 0, []
    for seconds in [*kill_after, None]:
        process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = process.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.communicate()
            delivered += 1
            statuses.append(process.returncode)
            continue
        statuses.append(process.returncode)
        if process.returncode != 0:
            log(f"  exit status {process.returncode}: {stderr[-1500:]}")
        if seconds is None or process.returncode != 0:
            break
    return {"kills_delivered": delivered, "statuses": statuses, "finished": statuses[-1] == 0}


def scenario(name: str, command, results, trials: int, max_resumes: int, scratch: Path, env: dict,
             rng: random.Random, log) -> dict:
    """One uninterrupted run, then `trials` killed-and-resumed runs of the same command."""
    expected, references = None, []
    for attempt in ("cold", "warm"):  # the second, with warm caches, is what the kills fall over
        began = time.perf_counter()
        reference = scratch / f"{name}-uninterrupted-{attempt}"
        done = subprocess.run(command(reference), env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: the uninterrupted run failed:\n{done.stderr[-3000:]}")
        duration = time.perf_counter() - began
        expected = results(reference) if expected is None else expected
        references.append({"run": attempt, "seconds": round(duration, 1), "equal_to_the_first": results(reference) ==
                           expected, "largest_metric_difference": largest_difference(results(reference), expected)})
    records = []
    for trial in tqdm(range(trials), desc=name, unit="trial"):
        workdir = scratch / f"{name}-{trial}"
        first = rng.uniform(0.5, duration)
        kills = [first] + [rng.uniform(0.5, duration / 2) for _ in range(rng.randint(0, max_resumes))]
        outcome = run_to_the_end(command(workdir), env, kills, log)
        equal = outcome["finished"] and results(workdir) == expected
        difference = largest_difference(results(workdir), expected) if outcome["finished"] else float("inf")
        records.append({"trial": trial, "kill_after_s": [round(k, 2) for k in kills], **outcome,
                        "results_equal": equal, "largest_metric_difference": difference,
                        "left_behind": left_behind(workdir)})
        log(f"{name} trial {trial}: kills at {records[-1]['kill_after_s']} s, delivered "
            f"{outcome['kills_delivered']}, finished {outcome['finished']}, equal {equal} (largest difference "
            f"{difference:.2g}), left behind {records[-1]['left_behind']}")
    delivered = sum(r["kills_delivered"] for r in records)
    shown = " ".join(["python", *command(Path("WORKDIR"))[1:]]).replace(str(scratch), "SCRATCH")  # no machine paths
    return {"command": shown,
            "uninterrupted_s": round(duration, 1), "uninterrupted_runs": references, "trials": len(records),
            "kills_delivered": delivered,
            "trials_finished": sum(r["finished"] for r in records),
            "trials_results_equal": sum(r["results_equal"] for r in records),
            "trials_results_within_1e-6": sum(r["largest_metric_difference"] <= 1e-6 for r in records),
            "files_left_behind": sorted({f for r in records for f in r["left_behind"]}), "records": records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="trials (one kill or more each), 60%% demo runs")
    parser.add_argument("--max-resumes", type=int, default=1, help="extra kills of a trial's resumed runs")
    parser.add_argument("--seed", type=int, default=0, help="the kill times' random draw")
    parser.add_argument("--out", default=str(RESULTS), help="the results JSON")
    parser.add_argument("--scratch", default=None, help="workdirs (default: a temporary folder, removed)")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="nexvitad-faults-"))
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "NEXVITAD_CACHE": str(scratch / "data-cache"), "JAX_COMPILATION_CACHE_DIR": str(scratch / "xla-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": str(REPO_ROOT)}
    rng = random.Random(args.seed)
    demo_trials = round(args.kills * 0.6)
    began = time.perf_counter()
    try:
        scenarios = {
            "demo_run": scenario("demo_run", demo_command, demo_results, demo_trials, args.max_resumes, scratch, env,
                                 rng, log),
            "table1_sweep": scenario("table1_sweep", lambda w: table1_command(w, scratch / "xla-cache"),
                                     table1_results, args.kills - demo_trials, args.max_resumes, scratch, env, rng,
                                     log)}
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    summary = {name: {key: value for key, value in s.items() if key != "records"} for name, s in scenarios.items()}
    given = list(argv if argv is not None else sys.argv[1:])
    shown = [("DIR" if i and given[i - 1] == "--scratch" else arg) for i, arg in enumerate(given)]  # no machine paths
    report = {"command": " ".join(["python benchmarks/faults.py", *shown]),
              "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs (shared with other work)",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(time.perf_counter() - began),
              "summary": summary, "scenarios": scenarios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
